from __future__ import annotations

import pytest

from autoq.backends import get_backend
from autoq.errors import AutoqError
from autoq.graph import Layer
from autoq.space import load_space, parse_space

ORT = get_backend("onnxruntime").unbuildable

LAYERS = [Layer("/conv1/Conv", "Conv", "w1", (8, 1, 3, 3), 80, 100), Layer("/fc/Gemm", "Gemm", "w2", (10, 8), 90, 80),
          Layer("/head/MatMul", "MatMul", "w3", (8, 2), 16, 16)]


def test_bundled_default_space_offers_fp32_and_int8_everywhere_and_int8_dyn_on_matmul():
    space = load_space(None)
    choices = space.choices(LAYERS, ORT)
    assert choices == {"/conv1/Conv": ["fp32", "int8"], "/fc/Gemm": ["fp32", "int8"],
                       "/head/MatMul": ["fp32", "int8", "int8-dyn", "int8-dyn-pc", "int8-dyn-pc-sq0.7"]}
    table = Layer("/embed/Gather", "Gather", "t", (30522, 384), 30522 * 384, 0)
    assert space.choices([table], ORT) == {"/embed/Gather": ["fp32", "w8g128", "w4g32"]}  # the recipes' sizes too


def test_first_matching_rule_wins():
    space = parse_space({"default": ["fp32", "int8"], "rules": [
        {"match": "re:/head/.*", "precisions": ["fp32"]},
        {"op_type": ["Conv", "MatMul"], "precisions": ["int8"]}]})
    assert space.choices(LAYERS, ORT) == {
        "/conv1/Conv": ["int8"], "/fc/Gemm": ["fp32", "int8"], "/head/MatMul": ["fp32"]}


@pytest.mark.parametrize(("text", "message"), [
    ("defaults: [fp32]\n", "key 'defaults': unknown key \\(allowed: .*default"),
    ("default: [fp32, int3]\n", "key 'default': precision 'int3': unknown form 'int3' \\(forms: fp32"),
    ("rules:\n  - op_type: MatMul\n    precisions: [int8-sym-pct101]\n",
     "key 'rules\\[0\\].precisions': precision 'int8-sym-pct101': calibration is one of"),
    ("default: [w4g48]\n", "key 'default': precision 'w4g48': groups are a power of two"),
    ("rules:\n  - match: x\n    precision: [fp32]\n", "key 'rules\\[0\\].precision': unknown key"),
    ("rules:\n  - match: 're:('\n    precisions: [fp32]\n", "rules\\[0\\].match': bad regular expression"),
    ("sampler: grid\n", "key 'sampler': unknown sampler 'grid' \\(registered: nsga2, tpe, gp, random\\)"),
    ("default: [fp32\nrules: 3\n", "invalid YAML at line"),
    ("- just\n- a list\n", "must be a YAML mapping"),
])
def test_bad_spaces_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(AutoqError, match=message) as error:
        load_space(path)
    assert str(path) in str(error.value)


def test_a_precision_the_backend_cannot_build_is_refused_with_its_reason():
    space = parse_space({"default": ["fp32", "bf16"]})
    with pytest.raises(AutoqError, match="bf16 is not available on this backend: ORT's CPU provider runs float"):
        space.choices(LAYERS, ORT)
    with pytest.raises(AutoqError, match="w8 is not available on this backend: MatMulNBits quantizes in blocks"):
        parse_space({"default": ["fp32", "w8"]}).choices(LAYERS, ORT)
    with pytest.raises(AutoqError, match="w2g32-gptq is not available on this backend: ORT's 2-bit blocks are rounded"):
        parse_space({"default": ["fp32", "w2g32-gptq"]}).choices(LAYERS, ORT)


def test_spaces_hold_canonical_spec_strings():
    space = parse_space({"default": ["fp32", "int8-minmax", "int8"], "rules": [
        {"op_type": "MatMul", "precisions": ["w4g32-asym-hqq", "int8-dyn-pc"]}]})
    assert space.default == ("fp32", "int8")
    assert space.rules[0].precisions == ("w4g32-hqq", "int8-dyn-pc")


def test_unknown_bundled_space_lists_the_bundled_ones():
    with pytest.raises(AutoqError, match="cpu-int8"):
        load_space("no-such-space")


BUNDLED = {"cpu-int8": "onnxruntime", "cpu-menu": "onnxruntime", "llm-cpu": "onnxruntime",
           "llm-cpu-learned": "onnxruntime", "openvino-cpu": "openvino", "openvino-weights": "openvino",
           "llm-openvino": "openvino", "torch-cpu": "torch", "torch-cpu-compiled": "torch"}


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_spaces_give_their_backend_only_specs_and_options_it_reads(name):
    """YAML reads `off` as false: every bundled space's options must still be values its backend knows, and every
    spec one its backend builds (a format this machine lacks is left out, not an error)."""
    from importlib.util import find_spec

    if BUNDLED[name] != "onnxruntime" and find_spec(BUNDLED[name]) is None:
        pytest.skip(f"the {BUNDLED[name]} extra is not installed")
    space = load_space(name)
    backend = get_backend(BUNDLED[name])
    assert backend.options(space.options).keys() == space.options.keys()
    assert space.choices([], backend.unbuildable, backend.lacks) == {}  # raises on a spec the backend cannot build


def test_a_precision_this_machine_lacks_is_left_out_with_a_note(capsys):
    """A spec the backend builds but this machine cannot run as stored (OpenVINO's `lacks`: a weight format its CPU
    plugin decompresses) drops out of every rule with one note; a rule left empty keeps fp32."""
    ov = get_backend("openvino") if __import__("importlib").util.find_spec("openvino") else None
    if ov is None:
        pytest.skip("the openvino extra is not installed")
    space = parse_space({"default": ["fp32", "nf4g32", "w4g32"], "rules": [
        {"op_type": ["Gemm"], "precisions": ["nf4g32"]}]})

    def lacks(precision):
        return "decompressed here" if precision.element == "nf" else None

    assert space.choices(LAYERS, ov.unbuildable, lacks) == {
        "/conv1/Conv": ["fp32", "w4g32"], "/fc/Gemm": ["fp32"], "/head/MatMul": ["fp32", "w4g32"]}
    assert capsys.readouterr().err.strip() == "autoq: nf4g32 left out of the space on this machine: decompressed here"
    with pytest.raises(AutoqError, match="does not store nf4 weights"):
        space.choices(LAYERS, ORT)
