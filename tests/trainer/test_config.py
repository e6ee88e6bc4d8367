import pytest

from leantrain.errors import UserError
from leantrain.trainer.config import accumulation_steps, fingerprint, find_config_file, load_config


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_bundled_quickstart_loads_by_name_and_by_path():
    by_name = load_config("quickstart")
    by_path = load_config(str(find_config_file("quickstart")))
    assert by_name == by_path
    assert by_name.model.preset == "tiny" and by_name.trainer.max_steps > 0


def test_overrides_apply_with_types(tmp_path):
    cfg = load_config(str(write(tmp_path, "optim:\n  lr: 0.1\n")), ["optim.lr=0.5", "trainer.max_steps=7",
                                                                       "optim.betas=[0.8,0.9]"])
    assert cfg.optim.lr == 0.5 and cfg.trainer.max_steps == 7 and cfg.optim.betas == [0.8, 0.9]


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path, "optim:\n  rnak: 4\n")
    with pytest.raises(UserError) as e:
        load_config(str(path))
    assert "optim.rnak" in str(e.value) and str(path) in str(e.value)


def test_unknown_key_on_command_line():
    with pytest.raises(UserError, match=r"command line.*model\.nrom"):
        load_config("quickstart", ["model.nrom=peri"])


def test_wrong_type_names_key():
    with pytest.raises(UserError, match=r"command line.*trainer\.max_steps"):
        load_config("quickstart", ["trainer.max_steps=many"])


def test_invalid_choice_names_key_file_and_choices(tmp_path):
    path = write(tmp_path, "model:\n  norm: side\n")
    with pytest.raises(UserError) as e:
        load_config(str(path))
    assert "model.norm" in str(e.value) and str(path) in str(e.value) and "peri" in str(e.value)


def test_state_bits_is_32_or_8():
    assert load_config("quickstart", ["optim.state_bits=8"]).optim.state_bits == 8
    with pytest.raises(UserError, match=r"'optim.state_bits': 4 \(choose one of 32, 8\)"):
        load_config("quickstart", ["optim.state_bits=4"])


def test_negative_and_zero_values_rejected():
    with pytest.raises(UserError, match="trainer.micro_batch_size"):
        load_config("quickstart", ["trainer.micro_batch_size=0"])


def test_missing_config_lists_bundled():
    with pytest.raises(UserError, match="quickstart"):
        load_config("no-such-config")


def test_override_without_equals_is_an_error():
    with pytest.raises(UserError, match="key=value"):
        load_config("quickstart", ["trainer.max_steps"])


@pytest.mark.parametrize("global_bs,micro,world,expected", [(16, 16, 1, 1), (16, 4, 2, 2), (32, 2, 4, 4)])
def test_accumulation_steps(global_bs, micro, world, expected):
    cfg = load_config("quickstart", [f"trainer.global_batch_size={global_bs}", f"trainer.micro_batch_size={micro}"])
    assert accumulation_steps(cfg.trainer, world) == expected


def test_indivisible_batch_is_an_error():
    cfg = load_config("quickstart", ["trainer.global_batch_size=10", "trainer.micro_batch_size=4"])
    with pytest.raises(UserError, match="global_batch_size"):
        accumulation_steps(cfg.trainer, 1)


def test_fingerprint_ignores_resumable_keys_only():
    base = fingerprint(load_config("quickstart"))
    assert base == fingerprint(load_config("quickstart", ["trainer.max_steps=999", "logging.progress=false",
                                                          "checkpoint.interval=7", "trainer.run_dir=elsewhere"]))
    assert base != fingerprint(load_config("quickstart", ["optim.lr=0.5"]))
    assert "optim.lr" in base and "model.norm" in base


def test_global_clipping_with_layerwise_updates_is_an_error():
    with pytest.raises(UserError, match="trainer.grad_clip.*optim.layerwise_clip"):
        load_config("quickstart", ["optim.layerwise=true"])
    assert load_config("quickstart", ["optim.layerwise=true", "trainer.grad_clip=0"]).optim.layerwise
