"""`nti fit` through LightningCLI, and every shipped YAML config."""

from pathlib import Path

import pytest

from nti_lightning import Inversion
from nti_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
ALL_CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "tests" / "configs").glob("*.yaml"))
#: `nti bench` configs (their own format); every other config is a LightningCLI's.
BENCH_CONFIGS = [
    config for config in ALL_CONFIGS if config.stem in ("bench_demo", "pie_bench") or config.stem.startswith("bench_")
]
CONFIGS = [config for config in ALL_CONFIGS if config not in BENCH_CONFIGS]


def subcommand(config: Path) -> str:
    return "predict" if config.stem.startswith("edit") else "fit"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand(config), "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "trainer:" in printed


@pytest.mark.parametrize("config", BENCH_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_bench_config_loads(config):
    from nti_lightning.bench.run import BenchConfig

    loaded = BenchConfig.load(config)
    assert loaded.methods and loaded.model["pretrained"]


def test_fit_writes_artifacts_grids_and_tensorboard(tmp_path, monkeypatch, images):
    monkeypatch.chdir(tmp_path)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"photo{i}.png")
        image.save(paths[-1])
    main([
        "fit", "--config", str(ROOT / "tests/configs/tiny.yaml"),
        "--data.images", f"[{','.join(str(p) for p in paths)}]",
        "--data.prompt", "a red circle on a blue background",
        "--model.output_dir", str(tmp_path / "out"),
    ])
    for i in range(3):
        inversion = Inversion.load(tmp_path / "out" / f"photo{i}.safetensors")
        assert inversion.null_embeddings.shape == (4, 77, 32)
        assert inversion.metadata["model"] == "tiny" and inversion.metadata["id"] == f"photo{i}"
        assert set(inversion.metadata["metrics"]) >= {"psnr", "ssim", "vae_psnr", "ddim_psnr", "psnr_vs_vae"}
        assert (tmp_path / "out" / f"photo{i}.png").stat().st_size > 0
    events = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent)).Reload()
    assert {"timestep/loss", "timestep/inner_iterations", "reconstruction/psnr"} <= set(accumulator.Tags()["scalars"])
    assert len(accumulator.Scalars("timestep/loss")) == 2 * 4  # two batches of B=2, T=4 each
    assert "grid/photo0" in accumulator.Tags()["images"]
    assert (tmp_path / "runs" / "nti").exists()


def test_single_image_and_prompt_from_the_command_line(tmp_path, monkeypatch, images):
    monkeypatch.chdir(tmp_path)
    images[0].save(tmp_path / "cat.jpg")
    main([
        "fit", "--config", str(ROOT / "tests/configs/tiny.yaml"),
        "--data.image", "cat.jpg", "--data.prompt", "a cat",
        "--model.output_dir", "out", "--model.save_grids", "false", "--trainer.logger", "false",
    ])
    assert Inversion.load(tmp_path / "out" / "cat.safetensors").prompt == "a cat"
    assert not (tmp_path / "out" / "cat.png").exists()
    # no logger: the resolved config goes beside the artifacts, not into the current directory
    assert "output_dir: out" in (tmp_path / "out" / "config.yaml").read_text()
    assert not (tmp_path / "config.yaml").exists()


def test_help_lists_the_commands_that_exist(capsys):
    main(["--help"])  # returns: exit status 0
    printed = capsys.readouterr().out
    commands = [line.split()[0] for line in printed.split("commands:")[1].strip().split("\n\n")[0].splitlines()]
    assert commands == ["fit", "predict", "app", "report", "train-demo", "bench"]
    assert "validate" not in printed and "test" not in commands
    with pytest.raises(SystemExit) as exit_info:
        main(["validate"])
    assert exit_info.value.code == 2
    assert "unknown command 'validate'; use one of: nti fit, nti predict" in capsys.readouterr().err


def test_missing_image_is_named_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "tests/configs/tiny.yaml"),
              "--data.image", "ghost.png", "--data.prompt", "x", "--model.output_dir", "out"])
    assert exit_info.value.code == 2
    assert "nti: error: ghost.png: image file not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
