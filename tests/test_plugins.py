"""Plugin kinds are registries that everything reads: a sampler or a sensitivity method registered in one place
shows in the CLI's help, is accepted by search spaces, and is used by the analyser, the cost model and the report."""

from __future__ import annotations

import pytest

from autoq import cli, data, graph
from autoq import sensitivity as sens
from autoq.backends import get_backend
from autoq.calibrate import calibrate
from autoq.costmodel import CostModel
from autoq.errors import AutoqError
from autoq.evaluate import Evaluator
from autoq.methods import METHODS, SensitivityMethod, register_method
from autoq.metrics import accuracy
from autoq.reporting.html import write_sensitivity_html
from autoq.samplers import SAMPLERS, register_sampler
from autoq.space import parse_space
from autoq.study import make_sampler


def params_rows(evaluator: Evaluator, pairs: list) -> list[dict]:
    """A toy method: a layer is as sensitive as it is large."""
    return [{"layer": layer.name, "op_type": layer.op_type, "params": layer.params, "macs": layer.macs,
             "precision": precision, "weight_count": float(layer.params), "score": float(layer.params)}
            for layer, precision in pairs]


@pytest.fixture
def plugins():
    import optuna

    register_sampler("every-other", lambda seed, population: optuna.samplers.QMCSampler(seed=seed),
                     "a quasi-Monte Carlo sampler (test plugin)")
    register_method(SensitivityMethod("params", "as sensitive as it is large (test plugin)",
                                      "tests.test_plugins:params_rows", "weight_count", "weights in the layer",
                                      lambda t: t["score"].to_numpy(float) * 1e-9))
    yield
    SAMPLERS.pop("every-other")
    METHODS.pop("params")


def test_registered_plugins_show_in_the_cli_help(plugins, capsys):
    for command, shown in (("search", "every-other: a quasi-Monte Carlo sampler"),
                           ("sensitivity", "params: as sensitive as it is large")):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert shown in " ".join(capsys.readouterr().out.split())


def test_a_registered_sampler_is_a_space_s_sampler(plugins):
    import optuna

    space = parse_space({"sampler": "every-other", "sensitivity": "params"})
    assert isinstance(make_sampler(space, 0), optuna.samplers.QMCSampler)


def test_unknown_plugins_are_errors_listing_the_registered_ones():
    with pytest.raises(AutoqError, match=r"unknown sampler 'annealing' \(registered: nsga2, tpe, gp, random\)"):
        parse_space({"sampler": "annealing"})
    with pytest.raises(AutoqError,
                       match=r"unknown method 'fisher' \(registered: measured, sqnr, calibrated, hessian, none\)"):
        parse_space({"sensitivity": "fisher"})


def test_a_registered_method_feeds_the_analyser_the_cost_model_and_the_report(plugins, digits_cnn, digits_npz,
                                                                               tmp_path):
    model = graph.prepare(digits_cnn, tmp_path)
    splits = data.split(data.load(digits_npz, "label"))
    evaluator = Evaluator(get_backend("onnxruntime"), model, calibrate(model, splits.calibration, tmp_path / "c"),
                          splits, accuracy, 1)
    choices = {n: ["fp32", "int8"] for n in model.layer_names}
    try:
        table = sens.analyse(evaluator, choices, "params")
    finally:
        evaluator.close()
    assert set(table["method"]) == {"params"}
    assert table.set_index("layer")["weight_count"].to_dict() == {la.name: la.params for la in model.layers}
    assert table["latency_saving_ms"].notna().all()  # the savings come with it, whatever the method
    prior = CostModel(table, choices).priors[0]
    assert list(prior) == pytest.approx([la.params * 1e-9 for la in model.layers])
    page = write_sensitivity_html(tmp_path / "sensitivity.html", table, "digits", "params").read_text()
    assert "Per-layer sensitivity (params)" in page and "weights in the layer" in page
