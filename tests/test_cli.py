"""Bad input exits non-zero with one line saying what is wrong, never a traceback."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest


def _autoq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoq", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, digits_npz):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "corrupt.onnx").write_bytes(b"\x00garbage" * 10)
    (folder / "space.yaml").write_text("default: [fp32, int8\nrules: [\n")
    (folder / "typo.yaml").write_text("defualt: [fp32]\n")
    images = np.load(digits_npz)["image"]
    np.savez(folder / "wrong_name.npz", pixels=images)
    np.savez(folder / "wrong_dtype.npz", image=images.astype(np.float64))
    nan = images.copy()
    nan[3, 0, 2, 2] = np.nan
    np.savez(folder / "nan.npz", image=nan)
    np.savez(folder / "empty.npz", image=images[:0])
    from onnx import TensorProto, helper, numpy_helper, save

    from tests.models import embedding_mlp

    _, ids = embedding_mlp(folder)  # embedding_mlp.onnx, ids.npz
    np.savez(folder / "far_ids.npz", ids=np.load(ids)["ids"] + 1000)  # beyond its 512-row table
    custom = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
         helper.make_node("Frobnicate", ["h"], ["y"], domain="com.example", name="custom")], "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.ones((64, 4), np.float32), "w")])
    save(helper.make_model(custom, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]),
         folder / "custom.onnx")
    np.savez(folder / "flat.npz", x=images.reshape(len(images), 64))
    return folder


CASES = {
    "missing model": (["{f}/nope.onnx", "--data", "{npz}"], "model file not found"),
    "corrupt model": (["{f}/corrupt.onnx", "--data", "{npz}"], "not a readable ONNX model"),
    "no data": (["{cnn}"], "no data"),
    "bad yaml": (["{cnn}", "--data", "{npz}", "--space", "{f}/space.yaml"], "invalid YAML at line"),
    "unknown key": (["{cnn}", "--data", "{npz}", "--space", "{f}/typo.yaml"], "key 'defualt': unknown key"),
    "input names": (["{cnn}", "--data", "{f}/wrong_name.npz"], "do not match the model inputs"),
    "dtype": (["{cnn}", "--data", "{f}/wrong_dtype.npz"], "float64 but the model expects float32"),
    "nan": (["{cnn}", "--data", "{f}/nan.npz"], "NaN"),
    "empty": (["{cnn}", "--data", "{f}/empty.npz"], "empty"),
    "labels in data": (["{cnn}", "--data", "{npz}"], "pass --labels label if it holds labels"),
    "metric": (["{cnn}", "--data", "{npz}", "--labels", "label", "--metric", "f1"], "unknown metric 'f1'"),
    "backend": (["{cnn}", "--data", "{npz}", "--backend", "tensorrt"], "unknown backend 'tensorrt'"),
    "labels": (["{cnn}", "--data", "{npz}", "--labels", "nolabels"], "labels 'nolabels'"),
    "budget": (["{cnn}", "--data", "{npz}", "--labels", "label", "--latency-budget", "fast"], "--latency-budget"),
    "unknown op": (["{f}/custom.onnx", "--data", "{f}/flat.npz"], "com.example:Frobnicate(-1) is not a registered"),
    "ids beyond the table": (["{f}/embedding_mlp.onnx", "--data", "{f}/far_ids.npz"], "indices element out of data"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_non_zero(case, inputs, digits_cnn, digits_npz, tmp_path):
    args, expected = CASES[case]
    args = [a.format(f=inputs, npz=digits_npz, cnn=digits_cnn) for a in args]
    result = _autoq("search", *args, "--out", str(tmp_path / "run"), "--quiet")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoq: error:"), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("args, expected", [
    (["search", "{cnn}", "--data", "{npz}", "--labels", "label", "--out", "/proc/autoq-run", "--quiet"],
     "cannot create the run directory /proc/autoq-run"),
    (["verify", "{tmp}"], "holds no finished autoq run"),
    (["search", "{cnn}", "--data", "{npz}", "--recipes", "some"], "invalid choice: 'some'"),
])
def test_unwritable_output_and_bad_run_directories_are_one_line(args, expected, digits_cnn, digits_npz, tmp_path):
    result = _autoq(*[a.format(cnn=digits_cnn, npz=digits_npz, tmp=tmp_path) for a in args])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert expected in lines[-1] and "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_warnings_are_hidden_unless_verbose(verbose, monkeypatch):
    """A user sees autoq's own lines: a library's warning is dropped (shown with --verbose), autoq's is kept."""
    import logging
    import warnings

    from autoq.quiet import VERBOSE_ENV, hush

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    if verbose:
        monkeypatch.setenv(VERBOSE_ENV, "1")
    if importlib.util.find_spec("nncf"):
        import nncf  # noqa: F401 - its logger first: one this test made would be a plain Logger for later tests
    levels = {name: logging.getLogger(name).level for name in ("", "nncf")}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        hush()
        warnings.warn_explicit("Failed to load _C_mxfp8", UserWarning, "torchao/__init__.py", 1, module="torchao")
        warnings.warn_explicit("calibration has 3 samples", UserWarning, "autoq/data.py", 1, module="autoq.data")
    assert [str(w.message) for w in seen] == (["Failed to load _C_mxfp8"] if verbose else []) + [
        "calibration has 3 samples"]
    quiet_nncf = logging.getLogger("nncf").getEffectiveLevel() >= logging.ERROR
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    logging.disable(logging.NOTSET)
    assert quiet_nncf or verbose


def test_a_library_that_sets_its_loggers_levels_at_import_stays_quiet():
    """torch sets its own loggers' levels when imported, after the CLI hushed them: torchao's import still must not
    print torch's `_pytree` warnings (they reached every torch run's terminal)."""
    pytest.importorskip("torchao", reason="the torch extra is not installed")
    code = "from autoq.quiet import hush; hush(); import torchao.quantization.pt2e; print('done')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "_pytree" not in done.stderr and done.stdout.strip().endswith("done")
    loud = subprocess.run([sys.executable, "-c", code.replace("hush(); ", "")], capture_output=True, text=True)
    assert "_pytree" in loud.stderr  # what hush() keeps off the terminal


def test_hushing_before_nncf_is_imported_leaves_nncf_its_own_logger():
    """The CLI hushes loggers at start, before any backend is imported: NNCF must still get its Logger subclass,
    whose `info_once` its weight compression calls (a plain logger made first failed every OpenVINO w8/w4 build)."""
    pytest.importorskip("nncf", reason="the openvino extra is not installed")
    code = ("import logging; from autoq.quiet import hush; hush(); import nncf; "
            "print(hasattr(logging.getLogger('nncf'), 'info_once'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "True"


def test_a_missing_backend_package_names_the_extra_but_autoqs_own_import_bug_is_not_hidden(monkeypatch):
    """A backend whose runtime is not installed is a one-line error naming the extra to install; an import error
    inside autoq itself is a bug and must surface as one, not as advice to install something."""
    from autoq.backends import base
    from autoq.errors import AutoqError

    for name in [m for m in sys.modules if m.split(".")[:3] == ["autoq", "backends", "openvino"]]:
        monkeypatch.delitem(sys.modules, name)  # the package and its modules, as if never imported
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(AutoqError, match=r"needs a package that is not installed \(openvino\).*autoq\[openvino\]"):
        base.get_backend("openvino")
    monkeypatch.setitem(base.BACKENDS, "broken", "autoq.backends.no_such_module:Backend")
    with pytest.raises(ModuleNotFoundError, match="autoq.backends.no_such_module"):
        base.get_backend("broken")


def test_import_autoq_loads_no_runtime_until_a_name_is_used():
    """`import autoq` (and so every worker's start) loads neither a runtime nor pandas, Optuna or plotly; the
    public names still resolve, to the same objects as their modules'."""
    code = ("import sys, autoq; heavy = [m for m in ('onnxruntime', 'pandas', 'optuna', 'plotly', 'torch', "
            "'openvino') if m in sys.modules]; print(heavy); from autoq.api import search; "
            "print(autoq.search is search and autoq.RunSettings.__module__ == 'autoq.settings')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[:2] == ["[]", "True"]
