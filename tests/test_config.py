import pytest

from latentlm.config import load_config, parse_override


@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("1E5", 1e5), (".5", 0.5), ("-2.0e+3", -2000.0),
                                         ("3", 3), ("'1e-4'", "1e-4"), ("abc", "abc"), ("1e", "1e")])
def test_numbers_in_scientific_notation_are_numbers(text, value):
    """YAML 1.1 (PyYAML's safe_load) reads 1e-4 as a string: an annealing rate written that way
    reached the Gumbel-CRF estimator as "1e-4" and failed on its first step."""
    _, got = parse_override(f"train.lr={text}")
    assert got == value and type(got) is type(value)


def test_a_documented_override_and_a_config_file_parse_rates_as_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {name: ptb}\nmodel: {type: lstm_lm}\nobjective: {type: elbo}\ntrain: {lr: 3e-4}\n")
    config = load_config(path, ["objective.estimator={type: gumbel_crf, method: ffbs, temperature: 1.0, anneal_rate: 1e-4}"])
    assert config.train.lr == 3e-4
    assert config.objective["estimator"]["anneal_rate"] == 1e-4
