"""hart-evaluate on a local Ray instance: generation and scoring actor pools over the shapes held-out
prompts with a random tiny export, stand-in feature networks built offline, reference statistics
reused under their protocol and refused under another, figures in files and in a real MLflow run;
per-category FID/KID against a reference made from a folder of category folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.evaluate import main as evaluate_main
from pipelines.clip_score import save_tiny_clip
from pipelines.inception import save_random_inception
from pipelines.shapes import label_of, render, sample_spec
from pipelines.shapes import prompts as heldout_prompts
from pipelines.shapes_classifier import accuracy


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from hart.config import tokenizer_config, transformer_config
    from hart.tokenizer.model import HybridTokenizer
    from hart.transformer.model import HARTForT2I
    from demo.config import demo_tokenizer, demo_transformer

    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    tokenizer = HybridTokenizer(tokenizer_config(demo_tokenizer()))
    tokenizer.save_pretrained(root / "export" / "tokenizer")
    model = HARTForT2I(transformer_config(demo_transformer()))
    model.init_weights()
    model.save_pretrained(root / "export" / "llm", ema_state=model.state_dict(), tokenizer=tokenizer.config)
    (root / "real").mkdir()
    for i in range(24):
        render(sample_spec(i, split="heldout"), 64).save(root / "real" / f"{i:03d}.png")
    return {"root": root, "export": root / "export", "inception": save_random_inception(root / "inception.pth"),
            "clip": save_tiny_clip(root / "clip", seed=2)}


def reference(assets, ray_local, size: int, name: str) -> str:
    out = assets["root"] / name
    code = evaluate_main(["reference", "--images", str(assets["root"] / "real"), "--image-size", str(size),
                          "--inception", str(assets["inception"]), "--out", str(out), "--protocol", "shapes"])
    assert code == 0
    return str(out)


def run(assets, out, *extra: str) -> int:
    return evaluate_main(["run", "--export", str(assets["export"]), "--prompts", "shapes:heldout", "--protocol", "shapes",
                          "--metrics", "fid,kid,clip,shapes", "--out", str(out), "--inception", str(assets["inception"]),
                          "--clip", str(assets["clip"]), "--cpus-per-actor", "0.5", "--score-batch", "8", *extra])


def test_two_actors_one_actor_same_images_and_figures_logged_to_mlflow(assets, ray_local, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    ref = reference(assets, ray_local, 64, "ref-64.safetensors")
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.create_experiment("training")
    run_id = client.create_run(experiment).info.run_id  # stands in for the training run of the checkpoint
    # ... and its checkpoint of step 300 as a logged model, which the figures are then logged against
    from trainer.checkpoint_models import CheckpointModels
    from trainer.config import load_train_config

    checkpoints = CheckpointModels(client, run_id, load_train_config(None, "joint", [
        "run.max_steps=300", "run.checkpoint_every=300"]).run)
    model_id = checkpoints.open(300)
    checkpoints.ready(300)
    assert run(assets, tmp_path / "a", "--reference", ref, "--actors", "2", "--tracking-uri", mlflow_server,
               "--run-id", run_id, "--step", "300") == 0
    assert run(assets, tmp_path / "b", "--reference", ref, "--actors", "1") == 0

    prompts = heldout_prompts("heldout")
    names = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert names == [f"heldout-{i:04d}.png" for i in range(len(prompts))]
    for name in names:  # seeded per group: the actor count does not change an image
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    for key in ("fid", "kid_mean", "clip_score", "colour_accuracy", "shape_accuracy", "joint_accuracy"):
        # same images, same figures; a scoring batch pads its prompts to its longest, so CLIP's last digits
        # depend on which images share a batch
        assert np.isfinite(a["figures"][key]) and a["figures"][key] == pytest.approx(b["figures"][key], rel=1e-6), key
    assert a["figures"]["fid"] > 0 and a["figures"]["images"] == len(prompts)
    # the shapes plugin gives the demo's figures for the same images (pipelines.shapes_classifier.accuracy)
    images = [Image.open(tmp_path / "a" / "images" / n).convert("RGB") for n in names]
    direct = accuracy(images, [label_of(p) for p in prompts])
    for key in ("colour_accuracy", "shape_accuracy", "joint_accuracy"):
        assert a["figures"][key] == pytest.approx(direct[key])
    protocol = json.loads((tmp_path / "a" / "protocol.json").read_text())
    assert protocol["protocol"]["more_smooth"] is False and protocol["fingerprint"]["image_size"] == 64

    logged = client.get_run(run_id).data.metrics
    assert logged["eval/fid"] == pytest.approx(a["figures"]["fid"])
    assert logged["eval/shapes/clip_score"] == pytest.approx(a["per_category"]["shapes"]["clip_score"])
    history = client.get_metric_history(run_id, "eval/clip_score")
    assert [m.step for m in history] == [300]
    artifacts = {f.path for f in client.list_artifacts(run_id, "eval/step-300")}
    assert {"eval/step-300/protocol.json", "eval/step-300/per_category.json", "eval/step-300/grid.png"} <= artifacts
    # the overall figures on the checkpoint's model, computed on the prompts and the reference statistics
    from pipelines.eval_protocol import prompt_set_identity, read_prompts
    from pipelines.inception import file_sha256

    name, digest = prompt_set_identity("shapes:heldout", read_prompts("shapes:heldout"), file_sha256(ref))
    on_model = {m.key: m for m in client.get_logged_model(model_id).metrics}
    assert set(on_model) == {f"eval/{key}" for key in a["figures"]}  # per-category figures stay run metrics
    assert on_model["eval/fid"].value == pytest.approx(a["figures"]["fid"]) and on_model["eval/fid"].step == 300
    assert (on_model["eval/fid"].dataset_name, on_model["eval/fid"].dataset_digest) == (name, digest[:36])
    (evaluated,) = client.get_run(run_id).inputs.dataset_inputs
    assert (evaluated.dataset.name, evaluated.dataset.digest) == (name, digest[:36])
    assert {t.key: t.value for t in evaluated.tags}["mlflow.data.context"] == "evaluation"


def test_reference_of_another_protocol_is_refused_and_missing_files_are_named(assets, ray_local, tmp_path, capsys):
    other = reference(assets, ray_local, 32, "ref-32.safetensors")  # made at 32 px, the images are 64 px
    assert run(assets, tmp_path / "c", "--reference", other, "--limit", "2") == 2
    assert "another protocol (image_size: file 32, this run 64)" in capsys.readouterr().err
    assert run(assets, tmp_path / "d", "--limit", "2") == 2  # FID without reference statistics
    assert "need reference statistics" in capsys.readouterr().err
    code = evaluate_main(["run", "--export", str(assets["export"]), "--prompts", "shapes:heldout", "--protocol",
                          "shapes", "--metrics", "clip", "--out", str(tmp_path / "e")])
    assert code == 2 and "needs a CLIP model folder" in capsys.readouterr().err
    assert evaluate_main(["run", "--export", str(tmp_path), "--prompts", "shapes:heldout", "--out", str(tmp_path)]) == 2
    assert "not an export folder" in capsys.readouterr().err


def test_demo_protocol_through_the_job_gives_the_in_process_sampler_images(assets, ray_local, tmp_path):
    """`make demo` scores its held-out samples through this job under the `demo` protocol: one seeded group
    sampled 32 at a time is the single `generate` call the demo made before, image for image (PNG bytes equal)."""
    from hart.transformer.generate import generate, load_models
    from pipelines.eval_stages import encode_png

    prompts = [p for p in heldout_prompts("heldout") for _ in range(2)]
    code = evaluate_main(["run", "--export", str(assets["export"]), "--prompts", "shapes:heldout", "--protocol", "demo",
                          "--out", str(tmp_path / "job"), "--cpus-per-actor", "0.5", "--set", "seed=5",
                          "--set", "images_per_prompt=2"])
    assert code == 0
    model, tok, encoder = load_models(str(assets["export"] / "llm"), str(assets["export"] / "tokenizer"), "minilm",
                                      ema=True, device="cpu")
    images = generate(model, tok, encoder, prompts, cfg=3.0, top_k=(16, 16), seed=5, batch_size=32,
                      head_cfg=1.0).images_BRR3
    files = sorted((tmp_path / "job" / "images").glob("*.png"))
    assert len(files) == len(images) == 36
    assert all(f.read_bytes() == encode_png(Image.fromarray(image)) for f, image in zip(files, images))


def test_hart_generate_under_a_protocol_makes_the_jobs_images_and_figures(assets, ray_local, tmp_path, capsys):
    """The same export, prompts and protocol through hart-generate and hart-evaluate: the same PNG files,
    so the same figures (the demo's figures come from hart-generate --protocol demo on its export)."""
    from jobs.generate import main as generate_main
    from trainer.generation import slug
    from pipelines.eval_protocol import PROTOCOLS, groups, read_prompts

    sets = ["--set", "images_per_prompt=2", "--set", "seed=3"]
    assert evaluate_main(["run", "--export", str(assets["export"]), "--prompts", "shapes:heldout", "--protocol", "demo",
                          *sets, "--out", str(tmp_path / "job"), "--cpus-per-actor", "0.5"]) == 0
    assert generate_main(["--export", str(assets["export"]), "--prompts", "shapes:heldout", "--protocol", "demo", *sets,
                          "--output", str(tmp_path / "generated"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    settings = "cfg 3.0, top-k (16, 16), top-p None, head cfg 1.0, residual head, EMA weights"
    assert printed.count(settings) == 2  # each job printed the settings it used
    import dataclasses

    protocol = dataclasses.replace(PROTOCOLS["demo"], images_per_prompt=2, seed=3)
    rows = [(i, p) for g in groups(read_prompts("shapes:heldout"), protocol) for i, p in zip(g["ids"], g["prompts"])]
    pngs = [(tmp_path / "generated" / f"{i}-{slug(p)}.png").read_bytes() for i, p in rows]
    assert pngs == [(tmp_path / "job" / "images" / f"{i}.png").read_bytes() for i, _ in rows]
    import io

    read = accuracy([Image.open(io.BytesIO(png)).convert("RGB") for png in pngs], [label_of(p) for _, p in rows])
    figures = json.loads((tmp_path / "job" / "metrics.json").read_text())["figures"]
    assert (read["colour_accuracy"], read["shape_accuracy"]) == (figures["colour_accuracy"], figures["shape_accuracy"])
    assert figures["startup_s"] > 0 and figures["images_per_s"] > 0  # throughput without the actors' start-up


def test_bad_output_and_mlflow_run_are_refused_before_any_image(assets, ray_local, s3_endpoint, tmp_path, capsys):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    base = ["run", "--export", str(assets["export"]), "--prompts", "shapes:heldout", "--protocol", "shapes", "--limit", "2"]
    assert evaluate_main([*base, "--out", "s3://no-such-bucket/eval", "--endpoint-url", s3_endpoint]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out=s3://no-such-bucket/eval: bucket 'no-such-bucket' does not exist" in err
    assert evaluate_main([*base, "--out", "s3://b/eval", "--endpoint-url", f"http://127.0.0.1:{closed}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not answer" in err and "--endpoint-url" in err
    assert evaluate_main([*base, "--out", str(tmp_path / "o"), "--tracking-uri",
                          f"sqlite:///{tmp_path / 'mlflow.db'}", "--run-id", "0123abcd"]) == 2
    assert "--run-id 0123abcd: not a run of" in capsys.readouterr().err
    assert not (tmp_path / "o" / "images").exists()


def test_a_store_that_dies_after_the_checks_ends_the_job_with_one_line(assets, ray_local, s3_bucket, s3_endpoint, capsys):
    """The generation actors' image writes fail once the store's retries are spent: the error comes back
    through Ray Data, and the CLI ends with one line naming the endpoint, exit code 1, no traceback."""
    from pipelines import storage
    from tests.faults.s3_fault_proxy import FaultProxy, assert_storage_error_line

    out = f"{s3_bucket}/eval"
    with FaultProxy(s3_endpoint) as counting:  # the requests of the job's output check, which the store answers
        storage.check_store(out, counting.url, "--out", "--endpoint-url")
    with FaultProxy(s3_endpoint, rate=1.0, kinds=("slowdown",), forward_first=counting.counts["requests"]) as proxy:
        code = evaluate_main(["run", "--export", str(assets["export"]), "--prompts", "shapes:heldout", "--protocol",
                              "shapes", "--metrics", "shapes", "--limit", "1", "--out", out, "--endpoint-url", proxy.url,
                              "--cpus-per-actor", "0.5"])
    assert code == 1 and proxy.faults() > 0
    assert_storage_error_line(capsys.readouterr().err, "hart-evaluate", proxy.url, "--endpoint-url")


def test_reference_from_shards_counts_what_it_leaves_out(assets, ray_local, tmp_path):
    """WebDataset shards as the reference source: good samples are scored, a shard of bad images and a
    garbage shard are counted (left_out, failed_shards), never silently dropped."""
    from pipelines.feature_statistics import FeatureStatistics
    from pipelines.hostile_shards import write_hostile_shards
    from pipelines.shapes import write_shapes_shards

    write_shapes_shards(str(tmp_path / "shards"), num_samples=24, num_shards=2, split="heldout")
    write_hostile_shards(str(tmp_path / "shards"), ["bad_images", "garbage_shard"])
    out = tmp_path / "ref-shards.safetensors"
    code = evaluate_main(["reference", "--shards", f"{tmp_path}/shards/*.tar", "--image-size", "64",
                          "--inception", str(assets["inception"]), "--out", str(out), "--protocol", "shapes"])
    assert code == 0
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        info = json.loads(f.metadata()["info"])
    assert (info["images"], info["samples"], info["left_out"], info["failed_shards"], info["shards"]) == (25, 32, 7, 1, 4)
    from pipelines.eval_protocol import PROTOCOLS
    from trainer.evaluation import feature_network_id

    stats = FeatureStatistics.load(out, PROTOCOLS["shapes"].fingerprint(feature_network_id(str(assets["inception"])), 64))
    assert stats.count == 25 and torch.isfinite(stats.sum_D).all()


def test_protocol_overrides_are_type_checked_and_a_foreign_reference_is_refused_before_generating(assets, tmp_path, capsys):
    from jobs.evaluate import build_config, parse_args
    from pipelines.feature_statistics import FeatureStatistics
    from trainer.evaluation import protocol_of

    def protocol(*sets):
        return protocol_of(build_config(parse_args(["run", "--export", "x", "--prompts", "y", "--out", "z"]
                                                   + [arg for item in sets for arg in ("--set", item)])))

    assert protocol("cfg=3", "top_k=[10,5]", "metrics=fid,clip", "head_cfg=null").top_k == (10, 5)
    for bad, words in (("seed=true", "protocol.seed: .*valid integer"), ("top_k=600", "protocol.top_k: .*valid array"),
                       ("head_cfg=abc", "protocol.head_cfg: .*valid number"), ("chunk_size=0", "must be >= 1"), ("colour=red", "FIELD one of")):
        with pytest.raises(ValueError, match=words):
            protocol(bad)
    # a reference of another feature network: refused before Ray starts or any image is generated
    foreign = tmp_path / "foreign.safetensors"
    FeatureStatistics(2048).save(foreign, {"feature_network": "another-network", "image_size": 64,
                                           "feature_resize": "tf1-bilinear-299"})
    assert run(assets, tmp_path / "f", "--reference", str(foreign), "--limit", "2") == 2
    assert "feature_network: file 'another-network'" in capsys.readouterr().err
    assert not (tmp_path / "f" / "images").exists()


def test_per_category_fid_and_kid_against_a_category_folder_reference(assets, ray_local, tmp_path, capsys):
    """A reference from MJHQ-30K's folder layout records its categories; a run computes FID/KID per
    category from that category's features alone on both sides (recomputed here from the files),
    logs them as `eval/<category>/fid`, and names the generated category the reference lacks."""
    from mlflow.tracking import MlflowClient

    from pipelines.eval_figures import load_reference_images
    from pipelines.eval_protocol import PROTOCOLS
    from pipelines.eval_stages import ScoreImages
    from pipelines.feature_statistics import FeatureStatistics, fold_order, frechet_distance, kernel_distance
    from trainer.evaluation import feature_network_id

    real = sorted((assets["root"] / "real").glob("*.png"))
    layout = {"shapes": real[:16], "animals": real[16:23]}  # <root>/mjhq30k_imgs/<category>/<id>.png
    for category, paths in layout.items():
        (tmp_path / "mjhq" / "mjhq30k_imgs" / category).mkdir(parents=True)
        for path in paths:
            (tmp_path / "mjhq" / "mjhq30k_imgs" / category / path.name).write_bytes(path.read_bytes())
    (tmp_path / "mjhq" / "loose.png").write_bytes(real[23].read_bytes())  # no category: overall only
    ref = tmp_path / "ref.safetensors"
    assert evaluate_main(["reference", "--images", str(tmp_path / "mjhq"), "--image-size", "64", "--inception",
                          str(assets["inception"]), "--out", str(ref), "--protocol", "shapes"]) == 0
    from safetensors import safe_open

    with safe_open(str(ref), framework="pt") as f:
        info = json.loads(f.metadata()["info"])
    assert (info["images"], info["categories"], info["uncategorised"]) == (24, {"animals": 7, "shapes": 16}, 1)
    network = feature_network_id(str(assets["inception"]))
    stats = FeatureStatistics.load(ref, PROTOCOLS["shapes"].fingerprint(network, 64))
    assert stats.count == 24 and {n: p.count for n, p in stats.by_category.items()} == {"animals": 7, "shapes": 16}

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"{i:02d}", "prompt": p, "category": "shapes" if i < 6 else "people"})
                               + "\n" for i, p in enumerate(heldout_prompts("heldout")[:8])))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = evaluate_main(["run", "--export", str(assets["export"]), "--prompts", str(prompts), "--protocol", "shapes",
                          "--metrics", "fid,kid", "--out", str(tmp_path / "out"), "--inception", str(assets["inception"]),
                          "--reference", str(ref), "--cpus-per-actor", "0.5", "--score-batch", "8",
                          "--tracking-uri", uri, "--experiment", "eval"])
    assert code == 0
    assert "no reference statistics for generated category people" in capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert result["no_reference_statistics"] == ["people"]
    assert "fid" not in result["per_category"]["people"] and result["per_category"]["people"]["images"] == 2

    # the same figures from each side's shapes features alone, extracted here from the files and folded
    # in the job's order (`fold_order` of the ids: a folder's ids number its sorted files)
    scorer = ScoreImages(["fid"], inception=str(assets["inception"]), device="cpu")
    files = sorted((tmp_path / "mjhq").rglob("*.png"))
    real_ids = [i for i in fold_order([f"{n:08d}" for n in range(len(files))]) if files[int(i)].parent.name == "shapes"]
    real_pngs = load_reference_images({"id": np.array(real_ids), "category": np.array(["shapes"] * 16, dtype=object),
                                       "path": np.array([str(files[int(i)]) for i in real_ids])}, 64)["png"]
    fake_ids = [i for i in fold_order([f"{n:02d}" for n in range(8)]) if int(i) < 6]
    fake_pngs = [(tmp_path / "out" / "images" / f"{i}.png").read_bytes() for i in fake_ids]
    real_only, fake_only = FeatureStatistics(stats.dim), FeatureStatistics(stats.dim)
    for side, pngs in ((real_only, list(real_pngs)), (fake_only, fake_pngs)):
        features_ND = np.array(list(scorer({"png": np.array(pngs, dtype=object)})["features"]), np.float32)
        side.update(torch.from_numpy(features_ND))
    shapes, protocol = result["per_category"]["shapes"], PROTOCOLS["shapes"]
    assert shapes["fid"] == pytest.approx(frechet_distance(real_only, fake_only), rel=1e-5)
    kid = kernel_distance(real_only, fake_only, protocol.kid_subsets, protocol.kid_subset_size, seed=protocol.seed)
    assert (shapes["kid_mean"], shapes["kid_std"], shapes["kid_subset_size"]) == pytest.approx(kid, rel=1e-4)
    assert shapes["kid_subset_size"] == 6 and shapes["fid"] != pytest.approx(result["figures"]["fid"])

    client = MlflowClient(tracking_uri=uri)
    logged = client.search_runs([client.get_experiment_by_name("eval").experiment_id])[0].data.metrics
    assert logged["eval/shapes/fid"] == pytest.approx(shapes["fid"])
    assert logged["eval/shapes/kid_mean"] == pytest.approx(shapes["kid_mean"])
    assert "eval/people/fid" not in logged and logged["eval/fid"] == pytest.approx(result["figures"]["fid"])


def test_per_category_distances_report_categories_the_reference_lacks():
    """Unit level: a generated category without reference statistics is listed, a category too small
    for KID gets FID only, and a reference without categories lists every generated category."""
    from pipelines.eval_figures import folder_category, per_category_distances, sample_category
    from pipelines.eval_protocol import EvalProtocol
    from pipelines.feature_statistics import FeatureStatistics

    g = torch.Generator().manual_seed(0)
    real, fake = FeatureStatistics(4), FeatureStatistics(4, kid_cap=12)
    real.update(torch.randn(20, 4, generator=g), ["food"] * 10 + ["art"] * 10)
    fake.update(torch.randn(14, 4, generator=g), ["food"] * 11 + ["people"] * 2 + ["art"])
    rows = {"food": {"images": 11}, "people": {"images": 2}, "art": {"images": 1}}
    protocol = EvalProtocol(metrics=("fid", "kid"), kid_subset_size=5)
    assert per_category_distances(real, fake, rows, protocol) == ["people"]
    assert set(rows["food"]) == {"images", "fid", "kid_mean", "kid_std", "kid_subset_size"}
    assert rows["food"]["kid_subset_size"] == 5 and rows["people"] == {"images": 2} and rows["art"] == {"images": 1}
    flat = FeatureStatistics(4)
    flat.update(torch.randn(20, 4, generator=g))
    assert per_category_distances(flat, fake, {k: {} for k in rows}, protocol) == ["art", "food", "people"]

    from pathlib import Path

    assert folder_category(Path("r/mjhq30k_imgs/people/1.jpg"), Path("r")) == "people"
    assert folder_category(Path("r/1.jpg"), Path("r")) == ""
    assert sample_category('{"category": "food", "url": "x"}') == "food"
    assert [sample_category(m) for m in ("", "not json", "[1]", '{"category": 3}', '{"caption": "a"}')] == [""] * 5


def test_a_star_export_is_evaluated_by_the_same_job(ray_local, tmp_path):
    """hart-evaluate on an export of hart-train model.family star (star/ema_model.pth + tokenizer/):
    STAR's sampler makes the images, the shapes classifier scores them, the figures are written."""
    from configuration.loader import replace
    from hart.config import tokenizer_config
    from hart.star.checkpoint import save_star
    from hart.star.config import STAR_PRESETS
    from hart.star.model import STARForT2I
    from hart.tokenizer.model import HybridTokenizer

    tok = tokenizer_config("tiny")
    torch.manual_seed(0)
    HybridTokenizer(tok).save_pretrained(tmp_path / "export" / "tokenizer")
    star = STARForT2I(replace(STAR_PRESETS["tiny"], patch_nums=tok.patch_nums, vocab_size=tok.vocab_size,
                              token_dim=tok.z_channels, text_dim=384, context_token=16))
    save_star(star, tmp_path / "export" / "star" / "ema_model.pth")
    code = evaluate_main(["run", "--export", str(tmp_path / "export"), "--prompts", "shapes:heldout", "--protocol", "shapes",
                          "--metrics", "shapes", "--limit", "4", "--out", str(tmp_path / "job"), "--cpus-per-actor", "0.5"])
    assert code == 0
    assert len(list((tmp_path / "job" / "images").glob("*.png"))) == 4
    figures = json.loads((tmp_path / "job" / "metrics.json").read_text())["figures"]
    assert figures["images"] == 4 and {"colour_accuracy", "shape_accuracy", "joint_accuracy"} <= set(figures)


def test_the_command_line_builds_the_typed_configs_from_their_defaults(tmp_path, monkeypatch, capsys):
    """Each sub-command's flags are its config's fields with the config's defaults; the config is checked
    on construction and never changed (absolute paths come in a copy)."""
    import dataclasses

    from jobs.evaluate import build_config, parse_args
    from trainer.evaluation import EvaluationConfig, ReferenceConfig, with_absolute_paths

    base = ["run", "--export", "e", "--prompts", "shapes:heldout", "--out", "o"]
    config = build_config(parse_args(base))
    assert config == EvaluationConfig(export="e", prompts="shapes:heldout", out="o")
    flagged = build_config(parse_args([*base, "--set", "cfg=3", "--set", "seed=1", "--metrics", "fid, clip",
                                       "--run-id", "abc", "--gpus-per-actor", "0.5", "--compile"]))
    assert (flagged.overrides, flagged.metrics, flagged.run_id) == (("cfg=3", "seed=1"), ("fid", "clip"), "abc")
    assert flagged.gpus_per_actor == 0.5 and flagged.compile and flagged.protocol == "hart-mjhq-1024"
    ref = build_config(parse_args(["reference", "--shards", "a.tar", "b.tar", "--image-size", "64", "--inception", "i",
                                   "--out", "r"]))
    assert ref == ReferenceConfig(shards=("a.tar", "b.tar"), image_size=64, inception="i", out="r")

    monkeypatch.chdir(tmp_path)
    absolute = with_absolute_paths(config)
    assert (absolute.export, absolute.out, absolute.prompts) == (str(tmp_path / "e"), str(tmp_path / "o"), "shapes:heldout")
    assert config.export == "e" and absolute.text_encoder == "minilm"  # the given config is left as it was
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.out = "elsewhere"
    with pytest.raises(ValueError, match="images \\(a folder\\) or shards, not both"):
        ReferenceConfig(images="f", shards=("a.tar",), image_size=64, inception="i", out="r")
    with pytest.raises(ValueError, match="protocol 'nope': expected one of"):
        EvaluationConfig(export="e", prompts="p", out="o", protocol="nope")
    assert evaluate_main([*base, "--actors", "0"]) == 2  # refused by the config, before Ray
    assert "hart-evaluate: actors must be >= 1, got 0" in capsys.readouterr().err
