"""One RingConfig: the staleness mitigation is the default everywhere; the paper's exact update is
one switch away.

- ``RingConfig()``, train.py's defaults, ``ds_configs/ouroboros.json``'s ``"ouroboros"`` object and
  ``initialize`` without one are the same: weight prediction H = 1, module K's look-ahead L = 2G - 1,
  the fresh partition, 100 synchronous first steps, each stage clipped at gradient_clipping /
  sqrt(G); ``RingConfig.paper()``, ``--paper`` and ``ds_configs/paper.json``: no prediction, no
  look-ahead, no synchronous steps, the balanced partition, each stage clipped at gradient_clipping
  (the update the paper's rule is tested against: docs/ring.md); the 1F1B baseline runs no ring; a
  flag on the command line beats the config's object. (``initialize`` itself: the "initialize"
  results of tests/multirank/test_sync_steps.py, test_lookahead.py and test_stage_clip.py.)
- Every check lives in RingConfig; contradictions fail with one line naming the flag or the key.
"""
from __future__ import annotations

import json
import os

import pytest

from ouroboros_ds.ring.config import RingConfig
from ouroboros_ds.train.config import load_deepspeed_config, parse_config

DEFAULT_MITIGATION = {k: getattr(RingConfig(), k) for k in RingConfig.PAPER}
PAPER = RingConfig.PAPER

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ring(argv):
    c = parse_config(argv)
    ds = load_deepspeed_config(c)
    assert "ouroboros" not in ds  # ours, not DeepSpeed's
    return c.ring.weight_prediction, c.ring.lookahead, c.ring.partition, c.ring.is_paper


@pytest.mark.parametrize("argv, expected", [
    ([], (DEFAULT_MITIGATION["weight_prediction"], DEFAULT_MITIGATION["lookahead"], DEFAULT_MITIGATION["partition"],
          False)),
    (["--paper"], (PAPER["weight_prediction"], PAPER["lookahead"], PAPER["partition"], True)),
    (["--deepspeed_config", "ds_configs/paper.json"], (0.0, 0.0, "balanced", True)),
    (["--deepspeed_config", "ds_configs/paper.json", "--schedule", "1f1b"], (0.0, 0.0, "balanced", True)),
    (["--schedule", "1f1b"], (0.0, 0.0, "balanced", True)),  # no ring: nothing to mitigate
    (["--weight-prediction", "2"], (2.0, DEFAULT_MITIGATION["lookahead"], "fresh", False)),
    (["--lookahead", "0.5"], (1.0, 0.5, "fresh", False)),
    (["--partition", "balanced"], (1.0, DEFAULT_MITIGATION["lookahead"], "balanced", False)),
    (["--weight-prediction", "0", "--lookahead", "0", "--partition", "balanced", "--sync-steps", "0",
      "--stage-clip", "whole", "--stale-lr-scale", "0"], (0.0, 0.0, "balanced", True)),  # = --paper's update
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_defaults_and_the_paper_switch(argv, expected):
    assert ring(argv) == expected


def test_the_default_looks_ahead_and_the_paper_does_not():
    assert DEFAULT_MITIGATION["lookahead"] == "auto" and PAPER["lookahead"] == 0.0
    assert ring([])[1] == "auto" and ring(["--paper"])[1] == 0.0  # 2G - 1 once the engine knows G


def test_the_delay_scaled_lr_is_on_where_the_delays_are_long():
    """'auto' (the default): C = 1 from 4 stages on (docs/parity.md: it closes part of the gap at G = 4
    and 8, and costs accuracy at G = 2); a number is taken as given; the paper's update has none."""
    assert DEFAULT_MITIGATION["stale_lr_scale"] == "auto" and PAPER["stale_lr_scale"] == 0.0
    assert [RingConfig().stale_lr_for(G) for G in (1, 2, 3, 4, 8, 16)] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert RingConfig(stale_lr_scale=0.5).stale_lr_for(2) == 0.5 and RingConfig.paper().stale_lr_for(8) == 0.0
    assert parse_config(["--stale-lr-scale", "2"]).ring.stale_lr_scale == 2.0
    assert parse_config(["--stale-lr-scale", "auto"]).ring == RingConfig()


def test_the_shipped_configs_say_it():
    for name in ("ouroboros.json", "ouroboros_bf16_zero1.json"):
        section = json.load(open(os.path.join(ROOT, "ds_configs", name)))["ouroboros"]
        assert RingConfig.from_section(section) == RingConfig() == RingConfig.from_section(None)
    paper = json.load(open(os.path.join(ROOT, "ds_configs", "paper.json")))["ouroboros"]
    assert paper == {"paper": True} and RingConfig.from_section(paper) == RingConfig.paper()


def test_library_and_command_line_share_the_default():
    """initialize's default (no object: RingConfig()) is train.py's default job's."""
    c = parse_config([])
    load_deepspeed_config(c)
    assert c.ring == RingConfig() and not RingConfig().is_paper and RingConfig.paper().is_paper
    assert RingConfig.paper(sync_steps=5).sync_steps == 5  # the paper's update with one change
    assert RingConfig().replace(sync_steps=0) == RingConfig(sync_steps=0)


@pytest.mark.parametrize("section, message", [
    ({"paper": True, "sync_steps": 5}, "'ouroboros'.paper: the paper's update has no staleness mitigation, but "
                                       "sync_steps set one"),
    ({"weight_predictoin": 1}, "'ouroboros': unknown option\\(s\\) \\['weight_predictoin'\\]"),
    ({"replay": "copy"}, "replay: expected one of"),
    ({"activation_budget": "1f1b"}, "activation_budget: bounds replay 'stash'"),
    ({"replay": "stash", "activation_budget": "lots"}, "--activation-budget 'lots': expected '1f1b'"),
    ({"partition": "budget"}, "partition: 'budget' needs replay 'stash'"),
    ({"stale_lr_scale": -1}, "stale_lr_scale: must be 'auto' .* or a number >= 0"),
    ({"stale_lr_scale": "twice"}, "stale_lr_scale: must be 'auto' .* or a number >= 0"),
])
def test_ring_config_checks_name_the_key(section, message):
    with pytest.raises(ValueError, match=message):
        RingConfig.from_section(section)
    assert RingConfig.from_section({"paper": True, "sync_steps": 0}) == RingConfig.paper()  # the paper's own value


@pytest.mark.parametrize("argv, message", [
    (["--paper", "--weight-prediction", "1"], "--paper: the paper's update has no staleness mitigation"),
    (["--paper", "--partition", "fresh"], "--paper: the paper's update has no staleness mitigation"),
    (["--paper", "--lookahead", "1"], "--paper: the paper's update has no staleness mitigation; drop "
                                      "--weight-prediction, --lookahead"),
    (["--schedule", "1f1b", "--lookahead", "1"], "--lookahead: only the ouroboros schedule has a ring"),
    (["--lookahead", "-1"], "--lookahead: must be .auto. \\(2G - 1 updates, at most 5 with the delay-scaled lr\\) or a number >= 0"),
    (["--schedule", "1f1b", "--weight-prediction", "1"], "--weight-prediction: only the ouroboros schedule"),
    (["--schedule", "1f1b", "--partition", "fresh"], "--partition: only the ouroboros schedule"),
    (["--schedule", "dualpipev", "--replay", "stash"], "--replay: only the ouroboros schedule"),
    (["--weight-prediction", "-1"], "--weight-prediction: must be a number >= 0"),
    (["--activation-budget", "1f1b"], "--activation-budget: bounds replay 'stash'"),
    (["--partition", "budget"], "--partition: 'budget' needs replay 'stash'"),
    (["--schedule", "ouroboros", "--activation-checkpointing"], "--activation-checkpointing applies to --schedule 1f1b"),
])
def test_contradictions_name_the_flags(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(argv)


def test_a_config_object_sets_lookahead_and_a_flag_beats_it(tmp_path):
    cfg = json.load(open(os.path.join(ROOT, "ds_configs", "ouroboros.json")))
    cfg["ouroboros"] = {"lookahead": 0.5}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert ring(["--deepspeed_config", str(path)]) == (1.0, 0.5, "fresh", False)
    assert ring(["--deepspeed_config", str(path), "--lookahead", "2"]) == (1.0, 2.0, "fresh", False)
    cfg["ouroboros"] = {"lookahead": -1}
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="--lookahead: must be 'auto' \\(2G - 1 updates, at most 5 with the delay-scaled lr\\) or a number >= 0"):
        ring(["--deepspeed_config", str(path)])
    cfg["ouroboros"] = {"lookahead": "far"}
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="--lookahead: must be 'auto'"):
        ring(["--deepspeed_config", str(path)])
    assert ring(["--lookahead", "auto"])[1] == "auto"  # resolved to 2G - 1 by the engine, which knows G


def test_the_lookahead_flag_is_built_like_the_others():
    from ouroboros_ds.train.config import build_parser

    help_text = build_parser().format_help()
    assert "--lookahead LOOKAHEAD" in help_text and "module K" in help_text


def test_a_config_object_with_a_typo_fails(tmp_path):
    cfg = json.load(open(os.path.join(ROOT, "ds_configs", "ouroboros.json")))
    cfg["ouroboros"] = {"weight_predictoin": 1}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="--deepspeed_config .*: 'ouroboros': unknown option"):
        load_deepspeed_config(parse_config(["--deepspeed_config", str(path)]))


def test_initialize_reads_the_object_and_hides_it_from_deepspeed(tmp_path):
    from ouroboros_ds.pipe.launch import _ring_section

    path = os.path.join(ROOT, "ds_configs", "ouroboros.json")
    config, section = _ring_section(path)
    assert RingConfig.from_section(section) == RingConfig() and "ouroboros" not in config
    assert _ring_section(os.path.join(ROOT, "ds_configs", "paper.json"))[1] == {"paper": True}
    plain = {"train_micro_batch_size_per_gpu": 1}
    assert _ring_section(plain) == (plain, {})


def test_stale_momentum_changes_only_the_stale_groups_beta1():
    import torch

    from ouroboros_ds.ring.staleness import stale_momentum

    fresh, stale = [torch.nn.Parameter(torch.zeros(1))], [torch.nn.Parameter(torch.zeros(1))]
    groups = [(0, fresh), (2, stale)]
    out = stale_momentum(groups, (0.9, 0.99), 0.95)
    assert out[0] == {"params": fresh} and out[1] == {"params": stale, "betas": (0.95, 0.99)}
    assert all("betas" not in g for g in stale_momentum(groups, (0.9, 0.99), 0.0))  # 0: off
    with pytest.raises(ValueError, match="stale_beta1"):
        stale_momentum(groups, (0.9, 0.99), 1.0)


def sync_steps(argv):
    c = parse_config(argv)
    load_deepspeed_config(c)
    return c.ring.sync_steps


@pytest.mark.parametrize("argv, expected", [
    ([], 100), (["--paper"], 0), (["--deepspeed_config", "ds_configs/paper.json"], 0), (["--schedule", "1f1b"], 0),
    (["--schedule", "dualpipev"], 0), (["--sync-steps", "7"], 7), (["--sync-steps", "0"], 0),
    (["--paper", "--sync-steps", "0"], 0), (["--deepspeed_config", "ds_configs/ouroboros_bf16_zero1.json"], 100),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_sync_steps_default_and_the_paper(argv, expected):
    assert DEFAULT_MITIGATION["sync_steps"] == 100 and PAPER["sync_steps"] == 0
    assert sync_steps(argv) == expected


@pytest.mark.parametrize("argv, message", [
    (["--sync-steps", "-1"], "--sync-steps: must be an integer >= 0"),
    (["--paper", "--sync-steps", "5"], "--paper: the paper's update has no staleness mitigation; drop "
                                       "--weight-prediction, --lookahead, --sync-steps"),
    (["--schedule", "1f1b", "--sync-steps", "5"], "--sync-steps: only the ouroboros schedule"),
    (["--schedule", "1f1b", "--stage-clip", "whole"], "--stage-clip: only the ouroboros schedule"),
])
def test_sync_steps_refusals_name_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(argv)


@pytest.mark.parametrize("value", [-3, 2.5, True, "10"])
def test_a_config_object_with_a_bad_sync_steps(tmp_path, value):
    cfg = json.load(open(os.path.join(ROOT, "ds_configs", "ouroboros.json")))
    cfg["ouroboros"] = {"sync_steps": value}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as info:
        sync_steps(["--deepspeed_config", str(path)])
    assert str(info.value).startswith("--sync-steps: must be an integer >= 0") and "\n" not in str(info.value)


def test_a_config_object_sets_sync_steps_and_a_flag_beats_it(tmp_path):
    cfg = json.load(open(os.path.join(ROOT, "ds_configs", "ouroboros.json")))
    cfg["ouroboros"] = {"sync_steps": 3}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert sync_steps(["--deepspeed_config", str(path)]) == 3
    assert sync_steps(["--deepspeed_config", str(path), "--sync-steps", "9"]) == 9
    assert "--sync-steps SYNC_STEPS" in __import__("ouroboros_ds.train.config", fromlist=["x"]).build_parser().format_help()


def stage_clip(argv):
    c = parse_config(argv)
    load_deepspeed_config(c)
    return c.ring.stage_clip


@pytest.mark.parametrize("argv, expected", [
    ([], "split"), (["--paper"], "whole"), (["--deepspeed_config", "ds_configs/paper.json"], "whole"),
    (["--schedule", "1f1b"], "whole"), (["--stage-clip", "whole"], "whole"),
    (["--deepspeed_config", "ds_configs/ouroboros_bf16_zero1.json"], "split"),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_stage_clip_default_and_the_paper(argv, expected):
    assert DEFAULT_MITIGATION["stage_clip"] == "split" and PAPER["stage_clip"] == "whole"
    assert stage_clip(argv) == expected


@pytest.mark.parametrize("argv, message", [
    (["--paper", "--stage-clip", "split"], "--paper: the paper's update has no staleness mitigation"),
    (["--schedule", "1f1b", "--stage-clip", "split"], "--stage-clip: only the ouroboros schedule"),
])
def test_stage_clip_refusals_name_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(argv)


def test_a_config_object_with_a_bad_stage_clip(tmp_path):
    cfg = json.load(open(os.path.join(ROOT, "ds_configs", "ouroboros.json")))
    cfg["ouroboros"] = {"stage_clip": "global"}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="--stage-clip: must be 'split' .* or 'whole' .*, got 'global'"):
        stage_clip(["--deepspeed_config", str(path)])
