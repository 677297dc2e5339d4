"""mtdisent's first-party plugins.

They register through the entry points in mtdisent's ``pyproject.toml``, exactly as a third-party
package would; the core never imports this package by name.
"""
