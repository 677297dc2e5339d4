import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mtdisent as md


def make(**kw):
    base = dict(tasks=[md.Task(name="a", num_classes=2), md.Task(name="b", num_classes=3)], input_shape=(1, 16, 16))
    base.update(kw)
    return md.Experiment(**base)


def test_classes_fill_num_classes():
    t = md.Task(name="plane", classes=["3VV", "LVOT", "Abd"])
    assert t.num_classes == 3 and t.class_names == ["3VV", "LVOT", "Abd"]
    assert md.Task(name="s", num_classes=2).class_names == ["0", "1"]


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(name="s", num_classes=1), ["num_classes", "greater than or equal to 2"]),
        (dict(name="s", classes=["only"]), ["'s'", "at least 2"]),
        (dict(name="s"), ["'s'", "num_classes"]),
        (dict(name="s", classes=["a", "b"], num_classes=3), ["num_classes=3", "2 names"]),
        (dict(name="s", classes=["a", "a"]), ["unique", "'a'"]),
        (dict(name="1bad", num_classes=2), ["name", "pattern"]),
        (dict(name="s", num_classes=2, loss_weight=-1.0), ["loss_weight", "greater than or equal to 0"]),
        (dict(name="s", num_clases=2), ["num_clases", "num_classes"]),
    ],
)
def test_task_validation_messages(kwargs, fragments):
    with pytest.raises(md.SpecError) as info:
        md.Task(**kwargs)
    for f in fragments:
        assert f in str(info.value), (f, str(info.value))
    assert isinstance(info.value, md.MtdisentError)


def test_duplicate_task_names():
    with pytest.raises(md.SpecError, match=r"tasks\[1\]\.name: duplicate task name 'a'"):
        make(tasks=[md.Task(name="a", num_classes=2), md.Task(name="a", num_classes=2)])


def test_no_task_is_refused_and_one_task_is_a_baseline_without_adversaries():
    with pytest.raises(md.SpecError, match="at least 1 task.*1 trains a single-task baseline without adversaries"):
        make(tasks=[])
    assert "at least one" in md.Experiment.__doc__ and "single-task baseline" in md.Experiment.__doc__
    single = make(tasks=[md.Task(name="a", num_classes=2)])
    model = md.build_model(single)
    assert model.pairs == [] and model.task_names == ["a"]


def test_nested_task_error_names_task_and_field():
    with pytest.raises(md.SpecError) as info:
        md.Experiment.model_validate({"tasks": [{"name": "a", "num_classes": 2}, {"name": "shadow", "num_classes": 1}]})
    assert "tasks[1].num_classes (task 'shadow')" in str(info.value)


def test_unknown_pair_task_suggests():
    with pytest.raises(md.SpecError) as info:
        make(pairs=[{"source": "a", "target": "bb"}])
    msg = str(info.value)
    assert "pairs[0].target" in msg and "'bb'" in msg and "Did you mean 'b'" in msg


def test_self_pair_and_duplicate_pair_rejected():
    with pytest.raises(md.SpecError, match="two tasks"):
        make(pairs=[{"source": "a", "target": "a"}])
    with pytest.raises(md.SpecError, match=r"already given as pairs\[0\]"):
        make(pairs=[{"source": "a", "target": "b"}, {"source": "a", "target": "b", "weight": 2}])


def test_negative_weights_rejected():
    with pytest.raises(md.SpecError, match=r"pairs\[0\]\.weight"):
        make(pairs=[{"source": "a", "target": "b", "weight": -0.5}])
    with pytest.raises(md.SpecError, match=r"adversary\.weight"):
        make(adversary={"weight": -1})


def test_unknown_backbone_and_objective_suggest_close_matches():
    with pytest.raises(md.SpecError) as info:
        make(backbone={"name": "dltk_resdual"})
    assert "backbone.name" in str(info.value) and "Did you mean 'dltk_residual'" in str(info.value)
    with pytest.raises(md.SpecError) as info:
        make(adversary={"objective": "minmx"})
    assert "adversary.objective.name" in str(info.value) and "'minmax'" in str(info.value)


def test_non_json_args_rejected():
    with pytest.raises(md.SpecError, match="JSON"):
        make(backbone={"name": "dltk_residual", "args": {"x": object()}})
    with pytest.raises(md.SpecError, match="finite"):
        make(backbone={"name": "dltk_residual", "args": {"x": float("nan")}})


def test_assignment_is_validated():
    e = make()
    with pytest.raises(md.SpecError, match="seed"):
        e.seed = "not a number"


def test_malformed_json_is_spec_error():
    with pytest.raises(md.SpecError, match="invalid Experiment JSON"):
        md.Experiment.model_validate_json("{not json")


def test_default_pairs_are_all_ordered_pairs():
    e = make(tasks=[md.Task(name=n, num_classes=2) for n in "xyz"], adversary={"ensemble": 1})
    assert [(p.source, p.target) for p in e.adversary_pairs()] == [
        ("x", "y"),
        ("x", "z"),
        ("y", "x"),
        ("y", "z"),
        ("z", "x"),
        ("z", "y"),
    ]


def test_pair_overrides():
    single = {"ensemble": 1}
    e = make(
        adversary=single,
        pairs=[{"source": "a", "target": "b", "enabled": False}, {"source": "b", "target": "a", "weight": 2.5}],
    )
    assert e.adversary_pairs() == [md.AdversaryPair("b", "a", 2.5)]
    e2 = make(adversary=single, all_pairs=False, pairs=[{"source": "a", "target": "b"}])
    assert e2.adversary_pairs() == [md.AdversaryPair("a", "b", 1.0)]
    e3 = make(pairs=[{"source": "b", "target": "a", "weight": 3.0}], all_pairs=False)  # the default ensemble
    m = e3.adversary.ensemble
    assert e3.adversary_pairs() == [md.AdversaryPair("b", "a", 3.0 / m, k) for k in range(m)]


# -- hypothesis: round trips and messages ---------------------------------------------------------
names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
finite = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
heads = st.builds(
    md.HeadSpec,
    hidden=st.lists(st.integers(1, 512), max_size=3),
    batchnorm=st.booleans(),
    activation=st.sampled_from(["relu", "gelu", "leaky_relu"]),
    dropout=st.floats(0, 0.9),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def experiments(draw):
    task_names = draw(st.lists(names, min_size=2, max_size=6, unique=True))
    tasks = []
    for n in task_names:
        if draw(st.booleans()):
            classes = draw(st.lists(st.text(min_size=1, max_size=6), min_size=2, max_size=5, unique=True))
            tasks.append(md.Task(name=n, classes=classes, loss_weight=draw(finite), head=draw(st.none() | heads)))
        else:
            tasks.append(md.Task(name=n, num_classes=draw(st.integers(2, 20)), loss_weight=draw(finite)))
    ordered = [(s, t) for s in task_names for t in task_names if s != t]
    chosen = draw(st.lists(st.sampled_from(ordered), unique=True, max_size=len(ordered)))
    pairs = [md.Pair(source=s, target=t, enabled=draw(st.booleans()), weight=draw(finite)) for s, t in chosen]
    return md.Experiment(
        tasks=tasks,
        pairs=pairs,
        all_pairs=draw(st.booleans()),
        backbone={"name": "dltk_residual", "args": draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3))},
        input_shape=draw(st.none() | st.tuples(st.integers(1, 4), st.integers(1, 512), st.integers(1, 512))),
        head=draw(heads),
        adversary=md.AdversarySpec(
            objective=draw(st.sampled_from(["minmax", "confusion", "gradient_reversal"])),
            weight=draw(finite),
            steps=draw(st.integers(0, 10)),
            features=draw(st.sampled_from(["fresh", "reuse"])),
        ),
        seed=draw(st.integers(0, 2**31)),
    )


@settings(max_examples=60, deadline=None)
@given(experiments())
def test_json_round_trip_is_lossless(e):
    again = md.Experiment.model_validate_json(e.model_dump_json())
    assert again == e
    assert again.model_dump_json() == e.model_dump_json()
    assert md.Experiment.model_validate(json.loads(e.model_dump_json())) == e


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["num_classes", "loss_weight"]), st.integers(-5, 1), names)
def test_bad_values_name_the_field_and_task(field, bad, tname):
    value = bad if field == "num_classes" else float(bad) - 2.0
    assume(tname != "other")
    tasks = [{"name": "other", "num_classes": 2}, {"name": tname, "num_classes": 2, field: value}]
    with pytest.raises(md.SpecError) as info:
        md.Experiment.model_validate({"tasks": tasks})
    assert f"tasks[1].{field} (task {tname!r})" in str(info.value)


def test_load_spec_json_and_python(tmp_path):
    e = make()
    js = tmp_path / "spec.json"
    js.write_text(e.model_dump_json())
    assert md.load_spec(js) == e
    py = tmp_path / "spec.py"
    py.write_text(
        "import mtdisent as md\n"
        "experiment = md.Experiment(tasks=[md.Task(name='a', num_classes=2), md.Task(name='b', num_classes=3)],"
        " input_shape=(1, 16, 16))\n"
    )
    assert md.load_spec(py) == e


def test_load_spec_errors_name_the_file(tmp_path):
    with pytest.raises(md.SpecError, match="does not exist"):
        md.load_spec(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tasks": [{"name": "a", "num_classes": 1}]}))
    with pytest.raises(md.SpecError, match="bad.json"):
        md.load_spec(bad)
    py = tmp_path / "none.py"
    py.write_text("x = 1\n")
    with pytest.raises(md.SpecError, match="defines no Experiment"):
        md.load_spec(py)
    boom = tmp_path / "boom.py"
    boom.write_text("raise RuntimeError('kaboom')\n")
    with pytest.raises(md.SpecError, match="boom.py.*kaboom"):
        md.load_spec(boom)


def test_presets():
    e = md.preset("paper_synthetic")
    assert e.input_shape == (1, 56, 72)
    assert e.adversary.weight == 0.01 and e.adversary.steps == 3
    # the paper's one unconditional adversary per ordered pair, whatever the library's default layout
    assert (e.adversary.layout, e.adversary.ensemble, e.adversary.conditional) == ("pair", 1, False)
    assert md.preset("paper_fetal_us").adversary.layout == "pair" and md.AdversarySpec().layout == "source"
    assert e.training.optimizer.betas == (0.0, 0.9) and e.training.optimizer.lr == 1e-5
    assert md.preset("paper_synthetic", scale=1.0).input_shape == (1, 224, 288)


@pytest.mark.parametrize("name", ["paper_synthetic", "paper_fetal_us"])
def test_a_preset_override_changes_only_the_fields_it_names(name):
    base = md.preset(name)
    e = md.preset(name, adversary={"weight": 0.1}, training={"iterations": 7, "optimizer": {"lr": 3e-4}})
    assert e.adversary == base.adversary.model_copy(update={"weight": 0.1})  # the paper's layout and members kept
    assert (e.training.iterations, e.training.optimizer.lr, e.training.optimizer.betas) == (7, 3e-4, (0.0, 0.9))
    assert e.training.l2 == base.training.l2 and e.tasks == base.tasks
    # another component, a list or a spec object replaces what was there
    other = md.preset(name, adversary={"objective": {"name": "hsic", "args": {}}}, head={"hidden": [32]})
    assert other.adversary.objective.name == "hsic" and other.head.hidden == [32]
    assert md.preset(name, adversary=md.AdversarySpec()).adversary == md.AdversarySpec()
    backbone = md.preset(name, backbone={"args": {"filters": [8, 16]}}).backbone  # args are one call's, not merged
    assert (backbone.name, backbone.args) == ("dltk_residual", {"filters": [8, 16]})


@pytest.mark.parametrize("scale", [0.125, 0.2, 0.25, 0.3125, 0.5, 1.0])
def test_paper_synthetic_preset_matches_the_shapes_dataset_size(scale):
    # 0.125 gives 28 x 36, where half-to-even rounding would disagree with the dataset's half-up rule
    data = md.datasets.get("shapes")(scale=scale)
    image, _ = data["test"][0]
    assert md.preset("paper_synthetic", scale=scale).input_shape == tuple(image.shape)
    us = md.preset("paper_fetal_us")
    assert us.head_for("plane").hidden == [256, 256] and us.head_for("shadow").hidden == [256]
    with pytest.raises(md.UnknownComponentError, match="paper_synthetic"):
        md.preset("paper_synthetc")


def test_a_misplaced_field_is_told_where_it_belongs_and_what_is_valid_here():
    with pytest.raises(md.SpecError) as info:
        md.Experiment.model_validate({"tasks": [{"name": "a", "num_classes": 2}], "training": {"seed": 1}})
    (line,) = [x for x in str(info.value).splitlines() if "unknown field" in x]
    assert "training.seed: unknown field 'seed'; 'seed' belongs at the top level (Experiment.seed)." in line
    valid = line.split("Valid here (TrainingSpec): ")[1]
    assert "'iterations'" in valid and "'batch_size'" in valid
    # only TrainingSpec's fields: nothing from the top level, the tasks or the heads
    for elsewhere in ("'seed'", "'tasks'", "'num_classes'", "'hidden'", "'weight'"):
        assert elsewhere not in valid, elsewhere
    assert valid.count("'") == 2 * len(md.TrainingSpec.model_fields)


@pytest.mark.parametrize(
    "spec, fragments",
    [
        (
            {"lr": 0.1},
            ["lr: unknown field 'lr'", "in training.optimizer or in training.adversary_optimizer", "OptimizerSpec.lr"],
        ),
        (
            {"tasks": [{"name": "a", "num_classes": 2, "hidden": [4]}]},
            ["tasks[0].hidden (task 'a')", "HeadSpec.hidden", "Valid here (Task)"],
        ),
        (
            {"training": {"iteratons": 3}},
            ["unknown field 'iteratons'. Did you mean 'iterations'?", "Valid here (TrainingSpec)"],
        ),
        (
            {"adversary": {"head": {"hiden": [3]}}},
            [
                "adversary.head.hiden",
                "Did you mean 'hidden'?",
                "Valid here (HeadSpec): 'activation', 'batchnorm', 'bias', 'dropout', 'hidden'.",
            ],
        ),
    ],
)
def test_unknown_fields_are_checked_against_their_own_section(spec, fragments):
    with pytest.raises(md.SpecError) as info:
        md.Experiment.model_validate({"tasks": [{"name": "a", "num_classes": 2}], **spec})
    for f in fragments:
        assert f in str(info.value), (f, str(info.value))
