from __future__ import annotations

import json

import numpy as np
import pytest

from autoq import metrics
from autoq.errors import AutoqError
from autoq.precision import Assignment, Precision


def test_assignment_round_trips_through_yaml_and_keys_ignore_order(tmp_path):
    a = Assignment({"b": "int8", "a": "fp32"}, {"reduce_range": False})
    loaded = Assignment.load(a.save(tmp_path / "a.yaml"))
    assert loaded == a
    assert Assignment({"a": "fp32", "b": "int8"}, {"reduce_range": False}).key() == a.key()
    assert Assignment({"a": "int8", "b": "int8"}).key() != a.key()
    assert a.summary() == "fp32 x1, int8 x1"


def test_unknown_precisions_and_versions_are_refused():
    with pytest.raises(AutoqError, match="precision 'int3': unknown form"):
        Assignment({"a": "int3"})
    with pytest.raises(AutoqError, match="version 9"):
        Assignment.from_dict({"version": 9, "layers": {}})


SPECS = ["fp32", "bf16", "fp16", "int8", "int8-sym", "int8-entropy", "int8-mse", "int8-pct99.99",
         "int8-sym-pct99.9", "int8-dyn", "int8-dyn-pc", "int8-dyn-pc-sq0.7", "int4-dyn-pc", "w8", "w8-asym", "w4g32",
         "w4g128-asym", "w4g32-hqq",
         "w8g128-acc4", "w4g64-asym-awq", "w4g128-se", "w4g32-hqq-acc4", "w4g32-kquant-acc4", "w2g64", "w3g128",
         "w2g32-acc4", "nf4", "nf4g64", "cb4g32", "km4g32", "km4", "fp8g128", "fp8", "fp4g32"]


@pytest.mark.parametrize("text", SPECS)
def test_canonical_strings_round_trip_and_name_distinct_specs(text):
    spec = Precision.parse(text)
    assert str(spec) == text
    assert Precision.parse(str(spec)) == spec
    assert spec.colour.startswith("#") and len(spec.colour) == 7


def test_specs_carry_their_fields_and_non_canonical_spellings_normalise():
    assert len({Precision.parse(t) for t in SPECS}) == len(SPECS)
    assert len({Precision.parse(t).colour for t in SPECS}) == len(SPECS)
    spec = Precision.parse("int8-pct99.99-sym")
    assert (spec.kind, spec.symmetric, spec.calibration, spec.percentile) == ("static", True, "percentile", 99.99)
    assert str(spec) == "int8-sym-pct99.99" and spec.calibration_key == "pct99.99"
    w4 = Precision.parse("w4g32-acc4-asym")
    assert (w4.kind, w4.bits, w4.group, w4.symmetric, w4.accuracy_level) == ("weight-only", 4, 32, False, 4)
    assert str(w4) == "w4g32-asym-acc4"
    assert Precision.parse("int8-dyn").granularity == "tensor"
    assert Precision.parse("int8-dyn-sq0.70-pc").smooth == 0.7 and str(Precision.parse("int8-dyn-sq.7-pc")) == (
        "int8-dyn-pc-sq0.7")
    assert Precision.parse("w4g32-hqq").symmetric is False  # HQQ fits zero points
    assert Precision.parse("w4g32-kquant").symmetric is False  # so do k-quants
    assert Assignment({"a": "int8-minmax"}).layers == {"a": "int8"}
    assert Precision.parse("w4g32").bytes_per_weight() == pytest.approx(0.5 + 4 / 32)
    nf4, fp8 = Precision.parse("nf4g64"), Precision.parse("fp8g128")
    assert (nf4.kind, nf4.bits, nf4.element, nf4.weight_label, nf4.symmetric) == ("weight-only", 4, "nf", "nf4", True)
    assert (fp8.bits, fp8.element, fp8.weight_label) == (8, "fp", "fp8") and Precision.parse("fp16").kind == "float"
    assert Precision.parse("w2g64").bytes_per_weight() == pytest.approx(0.25 + 4 / 64)


@pytest.mark.parametrize(("text", "problem"), [
    ("w4g48", "power of two"), ("int8-dyn-sym", "asymmetric"), ("fp32-sym", "takes no options"),
    ("w4g32-pct99", "calibration is for static"), ("w5g32", "2 or 3 or 4 or 8 bits"),
    ("nf8g32", "nf weights have 4 bits"), ("fp4g32-asym", "rounded to nearest"), ("nf4g32-awq", "rounded to nearest"),
    ("fp2", "4 or 8 bits"), ("int8-acc4", "weight-only"),
    ("w4g32-sym-hqq", "hqq fits a zero point"), ("int8-foo", "unknown option 'foo'"),
    ("int8-dyn-sq0.7", "int8-dyn-pc"), ("int8-sq0.5", "int8-dyn-pc"), ("int8-dyn-pc-sq1", "alpha in"),
    ("int4-dyn", "int4 per channel"), ("int4-dyn-pc-sq0.5", "int8-dyn-pc"), ("int4", "unknown form")])
def test_malformed_specs_are_one_line_errors(text, problem):
    with pytest.raises(AutoqError, match=problem) as error:
        Precision.parse(text)
    assert "\n" not in str(error.value) and f"'{text}'" in str(error.value)


def test_metrics_reward_closeness_to_the_reference():
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(50, 10))]
    near, far = [ref[0] + 0.01 * rng.normal(size=(50, 10))], [rng.normal(size=(50, 10))]
    for name in ("cosine", "top1", "top5", "sqnr"):
        metric = metrics.METRICS[name]
        assert metric(ref, near, None) > metric(ref, far, None), name
    assert metrics.cosine(ref, ref) == pytest.approx(1.0)
    labels = ref[0].argmax(1)
    assert metrics.accuracy(ref, ref, labels) == 1.0
    with pytest.raises(AutoqError, match="needs labels"):
        metrics.accuracy(ref, ref, None)


def test_a_kind_is_typed_and_reads_as_its_word():
    """`Precision.kind` is a Kind, equal to its plain word, so tables, JSON and YAML keep the words."""
    from autoq.precision import Kind

    spec = Precision.parse("w4g32")
    assert spec.kind is Kind.WEIGHT_ONLY and spec.kind == "weight-only" and f"{spec.kind}" == "weight-only"
    assert json.loads(json.dumps({"kind": spec.kind})) == {"kind": "weight-only"}
    assert {Precision.parse(p).kind for p in ("fp32", "int8", "int8-dyn", "w8")} == set(Kind)


def test_a_backend_builds_only_the_kinds_and_widths_it_lists():
    """The allow-list: a kind or width a backend does not list is refused with the backend's reason or the list
    it builds, before its own checks of the variant; every spec gets a colour."""
    from autoq.backends import get_backend
    from autoq.backends.base import Backend
    from autoq.precision import Kind

    ort, torch_backend = get_backend("onnxruntime"), get_backend("torch")
    assert "runs float layers in fp32" in ort.unbuildable(Precision.parse("bf16"))
    assert ort.unbuildable(Precision.parse("w4g32")) is None and ort.unbuildable(Precision.parse("w4")) is not None
    assert "no CPU kernel" in torch_backend.unbuildable(Precision.parse("w4g32"))
    for refusing in (ort, torch_backend, get_backend("openvino")):  # int4 dynamic is LiteRT's (XNNPACK) alone
        assert refusing.unbuildable(Precision.parse("int4-dyn-pc")) is not None
    assert get_backend("litert").unbuildable(Precision.parse("int4-dyn-pc")) is None

    class FloatOnly(Backend):
        name = "float-only"
        builds = {Kind.FLOAT: (32,)}
        refuses = build = runner = executed = layer_latency = recipes = export = lambda *a: None  # type: ignore

    reason = FloatOnly.unbuildable(FloatOnly.__new__(FloatOnly), Precision.parse("int8"))
    assert reason == "the float-only backend does not build 8-bit static (it builds float 32-bit)"
    colours = {Precision.parse(p).colour for p in ("fp32", "bf16", "int8", "int8-dyn", "w8", "w4g128", "w4g32-hqq")}
    assert len(colours) == 7 and all(c.startswith("#") and len(c) == 7 for c in colours)
