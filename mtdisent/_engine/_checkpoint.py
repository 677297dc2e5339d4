"""Checkpoints: tensors in safetensors, everything else in JSON; atomic writes; never unpickled.

Layout of a run directory::

    spec.json                      the experiment
    metrics.jsonl                  one JSON object per logged iteration
    checkpoints/iter-00000500/     tensors.safetensors + state.json (with the tensors' SHA-256)
    checkpoints/best/              the best checkpoint on validation data
    model.safetensors, model.json  the final inference model

A checkpoint directory is written under a temporary name, every file fsynced, then renamed into place,
so a crash leaves either the previous checkpoint or the new one, never a partial one that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._errors import MtdisentError
from .._model import MultiTaskModel, build_model
from .._spec import Experiment, saved_experiment

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "FORMAT_VERSION",
    "pack_state",
    "unpack_state",
    "set_aside",
    "write_checkpoint",
    "read_checkpoint",
    "latest_checkpoint",
    "prune_checkpoints",
    "atomic_write_text",
    "export_model",
    "load",
    "load_with_provenance",
]

FORMAT_VERSION = 2
_READABLE = {1, 2}  # version 1 (mtdisent 0.1) checkpoints still load as models; only version 2 resumes
_ITER_DIR = re.compile(r"^iter-(\d{8})$")
_TENSOR, _ITEMS = "__tensor__", "__items__"


class CheckpointError(MtdisentError):
    """A checkpoint is missing, truncated, corrupt or of an unknown format; the message names the file."""


def pack_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """A JSON-able copy of a nested state (dicts, lists, numbers, tensors): tensors move into ``tensors``.

    Each tensor is replaced by ``{"__tensor__": key}`` with ``key`` its name in ``tensors``; a dict with keys
    that are not strings (optimiser states are keyed by parameter index) becomes ``{"__items__": [[k, v], ...]}``.
    :func:`unpack_state` is the inverse.
    """
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {_TENSOR: prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: pack_state(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {_ITEMS: [[k, pack_state(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [pack_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    return obj


def unpack_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The nested state :func:`pack_state` packed, tensors put back."""
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if set(obj) == {_ITEMS}:
            return {k: unpack_state(v, tensors) for k, v in obj[_ITEMS]}
        return {k: unpack_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack_state(v, tensors) for v in obj]
    return obj


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _share(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _share(path: Path, directory: bool = False) -> None:
    """Give a file or directory made by ``tempfile`` (0600 / 0700) the permissions the umask allows.

    As ``open``/``mkdir`` would, so colleagues on a shared server can read a run.
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def set_aside(run_dir: Path) -> Path | None:
    """Move a run directory's training outputs (checkpoints, metrics, model) into ``discarded-<time>/`` inside it.

    Used when training restarts from iteration 0: nothing is deleted. Returns the folder, ``None`` if there
    was nothing to move.
    """
    names = ["checkpoints", "metrics.jsonl", "model.safetensors", "model.json", "tensorboard"]
    present = [n for n in names if (Path(run_dir) / n).exists()]
    if not present:
        return None
    target = Path(run_dir) / f"discarded-{time.strftime('%Y%m%d-%H%M%S')}"
    target.mkdir()
    for n in present:
        os.replace(Path(run_dir) / n, target / n)
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Atomically write ``directory`` holding ``tensors.safetensors`` and ``state.json``.

    An existing directory of that name is replaced only once the new one is complete.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".tmp-{directory.name}-"))
    try:
        tensor_file = tmp / "tensors.safetensors"
        save_file(_contiguous(tensors), str(tensor_file))
        _fsync_file(tensor_file)
        full = {"format_version": FORMAT_VERSION, "tensors_sha256": _sha256(tensor_file), **state}
        state_file = tmp / "state.json"
        state_file.write_text(json.dumps(full, indent=1, sort_keys=True), encoding="utf-8")
        _fsync_file(state_file)
        for f in (tensor_file, state_file):
            _share(f)
        _share(tmp, directory=True)
        _fsync_dir(tmp)
        if directory.exists():  # replace: move the old one aside first, then drop it
            old = directory.parent / f".old-{directory.name}-{os.getpid()}"
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
        _fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint directory; raises :class:`CheckpointError` naming the bad file."""
    directory = Path(directory)
    state_file, tensor_file = directory / "state.json", directory / "tensors.safetensors"
    for f in (state_file, tensor_file):
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {str(f)!r} is missing")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {str(state_file)!r} is corrupt or truncated: {exc}") from exc
    if not isinstance(state, dict) or state.get("format_version") not in _READABLE:
        version = state.get("format_version") if isinstance(state, dict) else None
        raise CheckpointError(
            f"checkpoint file {str(state_file)!r} has format_version {version!r}; this mtdisent reads "
            f"{' and '.join(map(str, sorted(_READABLE)))}"
        )
    if _sha256(tensor_file) != state.get("tensors_sha256"):
        raise CheckpointError(
            f"checkpoint file {str(tensor_file)!r} does not match the checksum in state.json (truncated or corrupt)"
        )
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {str(tensor_file)!r} cannot be read: {exc}") from exc
    # safetensors hands out views at the file's offsets (not 64-byte aligned); optimiser state restored as such
    # views changed the last bit of in-place matrix products (baddbmm_ on an SGD momentum buffer) after a resume.
    # Own, aligned memory per tensor, as the uninterrupted run has.
    return {k: v.clone() for k, v in tensors.items()}, state


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete-looking ``iter-*`` checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _ITER_DIR.match(p.name))


class CheckpointWarning(UserWarning):
    """A corrupt checkpoint was skipped in favour of an older valid one; the message names it."""


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies, ``None`` when the run has none.

    Checkpoints are written atomically, so a crash never leaves a corrupt one that looks complete; a newer
    checkpoint that does not verify has been damaged since. It is skipped with a :class:`CheckpointWarning`
    naming it (never silently), and left in place.

    Raises:
        CheckpointError: checkpoints exist but none verifies; the message names each one and why.
    """
    dirs = checkpoint_dirs(run_dir)
    errors: list[CheckpointError] = []
    for d in reversed(dirs):
        try:
            read_checkpoint(d)
        except CheckpointError as exc:
            errors.append(exc)
            continue
        for error in errors:
            warnings.warn(
                f"skipping a corrupt checkpoint, using {d.name} instead: {error}", CheckpointWarning, stacklevel=2
            )
        return d
    if errors:
        reasons = "; ".join(str(e) for e in errors)
        raise CheckpointError(
            f"none of the {len(dirs)} checkpoints in {str(Path(run_dir) / 'checkpoints')!r} verifies: {reasons}"
        )
    return None


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` ``iter-*`` checkpoints and any leftover temporary directories."""
    dirs = checkpoint_dirs(run_dir)
    for d in dirs[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


def export_model(run_dir: Path, model: MultiTaskModel, extra: dict[str, Any] | None = None) -> None:
    """Write the inference model (``model.safetensors`` + ``model.json``) atomically."""
    run_dir = Path(run_dir)
    state = {
        "format_version": FORMAT_VERSION,
        "experiment": json.loads(model.experiment.model_dump_json()),
        "input_shape": list(model.input_shape),
        **(extra or {}),
    }
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".model.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(_contiguous(model.state_dict()), tmp)
        _fsync_file(Path(tmp))
        _share(Path(tmp))
        state["tensors_sha256"] = _sha256(Path(tmp))
        os.replace(tmp, run_dir / "model.safetensors")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_text(run_dir / "model.json", json.dumps(state, indent=1, sort_keys=True))


def _model_from(
    tensors: dict[str, torch.Tensor], experiment: Experiment, input_shape: Any, where: Path
) -> MultiTaskModel:
    model = build_model(experiment, tuple(input_shape) if input_shape else None)
    model_tensors = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")} or tensors
    try:
        model.load_state_dict(model_tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {str(where)!r} do not fit the experiment's model: {exc}") from exc
    return model


def check_which(which: str) -> None:
    """Raise :class:`CheckpointError` unless ``which`` names a model of a run: final, best or latest."""
    if which not in {"final", "best", "latest"}:
        raise CheckpointError(f"which={which!r}: expected 'final', 'best' or 'latest'")


def load(path: str | os.PathLike[str], which: str = "final", device: str | torch.device = "cpu") -> MultiTaskModel:
    """Load an inference model from a run directory or a checkpoint directory; nothing is unpickled.

    Args:
        path: A run directory (``out_dir`` of :func:`~mtdisent.train`) or one of its checkpoint directories.
        which: For a run directory: ``"final"`` (the exported model; falls back to the latest checkpoint when
            training has not finished), ``"best"`` (best on validation data) or ``"latest"``.
        device: Where to put the model.

    Returns:
        The :class:`~mtdisent.MultiTaskModel` in eval mode.

    Raises:
        CheckpointError: nothing loadable there, or the files are corrupt; the message names the file.
    """
    return load_with_provenance(path, which, device)[0]


def load_with_provenance(
    path: str | os.PathLike[str], which: str = "final", device: str | torch.device = "cpu"
) -> tuple[MultiTaskModel, dict[str, Any]]:
    """:func:`load`, also saying what was loaded: ``{"checkpoint": label, "iteration": n}``.

    The label is ``"final"``, ``"best"``, ``"latest"``, ``"checkpoint <name>"`` for a checkpoint directory,
    ``"final (the run has no best checkpoint)"`` for ``"best"`` from a run trained without validation (as
    :meth:`~mtdisent.Run.model_at` gives it), or ``"latest (the run has no <which> model)"`` when a run directory
    lacks the model asked for.
    """
    path = Path(path)
    check_which(which)
    if (path / "state.json").is_file():  # a checkpoint directory
        tensors, state = read_checkpoint(path)
        model = _model_from(tensors, saved_experiment(state["experiment"]), state.get("input_shape"), path)
        return model.to(device).eval(), {
            "checkpoint": f"checkpoint {path.name}",
            "iteration": state.get("iteration"),
        }
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is not a run or checkpoint directory")
    has_best = (path / "checkpoints" / "best").is_dir()
    no_best = which == "best" and not has_best
    if (which == "final" or no_best) and (path / "model.json").is_file():
        meta_file, tensor_file = path / "model.json", path / "model.safetensors"
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{str(meta_file)!r} is corrupt: {exc}") from exc
        if not tensor_file.is_file() or _sha256(tensor_file) != meta.get("tensors_sha256"):
            raise CheckpointError(f"{str(tensor_file)!r} is missing or does not match the checksum in model.json")
        try:
            tensors = load_file(str(tensor_file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{str(tensor_file)!r} cannot be read: {exc}") from exc
        model = _model_from(tensors, saved_experiment(meta["experiment"]), meta.get("input_shape"), tensor_file)
        label = "final (the run has no best checkpoint)" if no_best else "final"
        return model.to(device).eval(), {"checkpoint": label, "iteration": meta.get("iteration")}
    if which == "best" and has_best:
        model, info = load_with_provenance(path / "checkpoints" / "best", device=device)
        return model, {**info, "checkpoint": "best"}
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{str(path)!r} holds no model.safetensors and no valid checkpoint")
    model, info = load_with_provenance(latest, device=device)
    label = "latest" if which == "latest" else f"latest (the run has no {which} model)"
    return model, {**info, "checkpoint": label}
