"""Ground truth for a user's model and training: Adam/AdamW batched, a user's train_fn,
request hashing (existing stores keep their keys), resume after SIGKILL, LDS model checks."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from sigkill import kill_after_first_chunk
from torch import nn

from curvinf.data import DataSplit, load_dataset
from curvinf.groundtruth import (
    GroundTruthConfig,
    ground_truth,
    store_name,
    store_request,
    take_queries,
)
from curvinf.losses import example_measure
from curvinf.models import make_mlp
from curvinf.retrain import train_many
from curvinf.storage import request_hash
from curvinf.training import TrainingRecipe, epoch_batches, train

TESTS = Path(__file__).parent
ROOT = TESTS.parent
pytestmark = [
    pytest.mark.filterwarnings("ignore::curvinf.groundtruth.RetrainingWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


class SmallNet(nn.Module):
    """Not an MLP of the fused path: LayerNorm and a functional activation."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.inp, self.norm, self.out = (
            nn.Linear(64, width),
            nn.LayerNorm(width),
            nn.Linear(width, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.norm(self.inp(x))))


def factory() -> nn.Module:
    return SmallNet().double()


def wide_factory() -> nn.Module:
    return SmallNet(width=9).double()


def adam_loop(model: nn.Module, X: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    """A user's own training: torch.optim.Adam, 2 epochs of batches of 16."""
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        for b in torch.randperm(len(X), generator=g).split(16):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[b]), y[b]).backward()
            opt.step()
    return model


def tiny_data() -> DataSplit:
    d = load_dataset("digits", seed=0, dtype=torch.float64)
    return replace(d, X_train=d.X_train[:80], y_train=d.y_train[:80], X_query=d.X_query[:12],
                   y_query=d.y_query[:12])  # fmt: skip


def fn_config() -> GroundTruthConfig:
    return GroundTruthConfig(model=factory, train_fn=adam_loop, num_subsets=3, num_seeds=2, seed=1)


def build_fn(store: Path):
    """The train_fn store of the SIGKILL test (also run by its child process)."""
    return ground_truth(tiny_data(), fn_config(), store, progress=False, models_per_chunk=2)


def measure(model: nn.Module, data: DataSplit) -> torch.Tensor:
    with torch.no_grad():
        f = model.eval()(data.X_query)
    return torch.stack([example_measure("ce", "loss", f[i], data.y_query[i]) for i in range(12)])


def torch_optim(model, recipe, X, y, subset, seed):
    """Reference: torch.optim.Adam/AdamW over the batches curvinf draws."""
    model = copy.deepcopy(model)
    cls = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
    opt = cls(model.parameters(), lr=recipe.lr, betas=recipe.betas, eps=recipe.eps,
              weight_decay=recipe.weight_decay)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    for _ in range(recipe.epochs):
        for b in epoch_batches(subset, recipe.batch_size, g):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[b]), y[b]).backward()
            opt.step()
    return dict(model.named_parameters())


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
@pytest.mark.parametrize("make", ["mlp", "smallnet"])
def test_batched_adam_equals_torch_optim(optimizer, make):
    """Both train_many paths (fused MLP, generic vmap) and train: torch.optim's numbers."""
    data = tiny_data()
    X, y = data.train
    model = make_mlp(64, 10, depth=1, width=6, dtype=torch.float64) if make == "mlp" else factory()
    recipe = TrainingRecipe(lr=0.02, batch_size=16, epochs=2, optimizer=optimizer,
                            weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)  # fmt: skip
    subsets = torch.stack([torch.randperm(80, generator=torch.Generator().manual_seed(k))[:40]
                           for k in range(3)]).sort(1).values  # fmt: skip
    seeds = [5, 6, 7]
    many = train_many(model, nn.CrossEntropyLoss(), X, y, recipe, subsets=subsets, seeds=seeds)
    for k, seed in enumerate(seeds):
        want = torch_optim(model, recipe, X, y, subsets[k], seed)
        one = train(model, nn.CrossEntropyLoss(), X, y, replace(recipe, seed=seed),
                    subset=subsets[k]).model  # fmt: skip
        for name, p in one.named_parameters():
            torch.testing.assert_close(
                many.params[name][k], want[name].detach(), rtol=0, atol=1e-12
            )
            torch.testing.assert_close(p.detach(), want[name].detach(), rtol=0, atol=1e-12)


def test_recipe_optimizer_fields_and_hash_stability():
    old_keys = {"lr", "momentum", "weight_decay", "batch_size", "epochs", "seed"}
    assert set(TrainingRecipe().to_dict()) == old_keys  # SGD recipes hash as before
    d = TrainingRecipe(optimizer="adamw", weight_decay=0.01).to_dict()
    assert d["optimizer"] == "adamw" and d["betas"] == [0.9, 0.999] and "momentum" not in d
    assert TrainingRecipe(optimizer="adam", betas=[0.9, 0.99]).betas == (0.9, 0.99)
    with pytest.raises(ValueError, match="optimizer"):
        TrainingRecipe(optimizer="rmsprop")
    with pytest.raises(ValueError, match=r"betas\[1\] must lie in \[0, 1\)"):
        TrainingRecipe(optimizer="adam", betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="do nothing with optimizer='sgd'"):
        TrainingRecipe(betas=(0.8, 0.9))


def committed_manifests() -> list[Path]:
    return sorted(ROOT.glob("results/*/groundtruth/*/manifest.json"))


@pytest.mark.skipif(not committed_manifests(), reason="no stored ground truth in results/")
def test_existing_store_keys_are_unchanged():
    """The library's MLP stores under results/ (read only) keep their request, key and name
    (the CNN and transformer studies' stores are keyed by their models, tested elsewhere)."""
    seen = set()
    for file in committed_manifests():
        manifest = json.loads(file.read_text())
        req = manifest["request"]
        m, sub, rt = req["model"], req["subsets"], req["retraining"]
        if "depth" not in m:  # a CNN / transformer study's store: a user model, not an MLP
            continue
        config = GroundTruthConfig(
            depth=m["depth"], width=m["width"], activation=m["activation"],
            init=m.get("init", "torch"), model_seed=m["seed"], dtype=m["dtype"],
            recipe=TrainingRecipe(**req["recipe"]), loss=req["loss"], measure=req["measure"],
            num_subsets=sub["num_subsets"], alpha=sub["alpha"], num_seeds=rt["num_seeds"],
            seed=sub["seed"], matched_steps=rt["matched_steps"], vary_init=rt["vary_init"],
        )  # fmt: skip
        d = req["data"]
        n_all = d["n_train"] + (1797 - d["n_train"])
        fraction = round(1 - d["n_train"] / n_all, 1)
        data = load_dataset(d["name"], query_fraction=fraction, seed=d["seed"])
        data = take_queries(data, d["n_query"]).to(getattr(torch, m["dtype"]))
        assert store_request(config, data) == req, file
        assert request_hash(req) == manifest["key"], file
        assert store_name(config, data) == file.parent.name, file
        seen.add(file.parent.parent.parent.name)
    assert seen


def test_user_model_with_batched_adam(tmp_path):
    data = tiny_data()
    recipe = TrainingRecipe(lr=0.01, batch_size=16, epochs=2, optimizer="adam")
    config = GroundTruthConfig(model=factory, recipe=recipe, num_subsets=3, num_seeds=2, seed=1)
    gt = ground_truth(data, config, tmp_path, progress=False)
    assert gt.models_trained == 6 and "SmallNet-e2-M3R2" in gt.path.name
    req = gt.manifest["request"]
    assert req["model"]["kind"] == "custom" and req["model"]["class"].endswith(".SmallNet")
    assert req["recipe"]["optimizer"] == "adam"
    j, r = 2, 1
    start = config.make_model(data)
    seeded = replace(recipe, seed=int(gt.seeds[j, r]))
    alone = train(start, nn.CrossEntropyLoss(), *data.train, seeded, subset=gt.masks[j]).model
    torch.testing.assert_close(gt.measurements[j, r], measure(alone, data), rtol=0, atol=1e-10)
    again = ground_truth(data, config, tmp_path, progress=False)
    assert again.models_trained == 0 and torch.equal(again.truth, gt.truth)


def test_request_covers_the_model():
    data = tiny_data()
    config = GroundTruthConfig(model=factory, num_subsets=3, num_seeds=2)
    key = request_hash(store_request(config, data))
    assert request_hash(store_request(config, data)) == key  # same factory, same key
    others = [
        replace(config, model=wide_factory),  # other structure
        replace(config, model_seed=1),  # other initial weights
        replace(config, model=factory()),  # a template: its weights, no seed
        replace(config, model=None),  # the library's MLP
    ]
    keys = {request_hash(store_request(c, data)) for c in others}
    assert len(keys) == 4 and key not in keys
    template = store_request(others[2], data)["model"]
    assert template["init"] != store_request(config, data)["model"]["init"]


def test_train_fn_store_is_the_users_training(tmp_path):
    data = tiny_data()
    gt = build_fn(tmp_path)
    assert gt.models_trained == 6 and "SmallNet-fn-adam_loop" in gt.path.name
    training = gt.manifest["request"]["training"]
    assert training["function"].endswith(".adam_loop") and training["source_sha256"]
    assert "recipe" not in gt.manifest["request"] and gt.manifest["layout"]["num_chunks"] == 3
    j, r = 1, 0
    rows = gt.masks[j].nonzero().squeeze(1)
    seed = int(gt.seeds[j, r])
    alone = adam_loop(fn_config().make_model(data), data.X_train[rows], data.y_train[rows], seed)
    torch.testing.assert_close(gt.measurements[j, r], measure(alone, data), rtol=0, atol=1e-12)
    base = adam_loop(fn_config().make_model(data), *data.train, fn_config().seed)
    for name, p in base.named_parameters():
        assert torch.equal(gt.base_params[name], p.detach())


def test_user_model_resumes_after_sigkill_with_identical_numbers(tmp_path):
    reference = build_fn(tmp_path / "uninterrupted")
    store = tmp_path / "killed"
    kill_after_first_chunk("test_user_groundtruth", "build_fn", store)

    resumed = build_fn(store)
    assert resumed.models_trained == 6 - 2 and resumed.path.name == reference.path.name
    for field in ("truth", "measurements", "train_loss", "query_loss", "query_accuracy"):
        assert torch.equal(getattr(resumed, field), getattr(reference, field)), field
    assert all(torch.equal(v, reference.base_params[k]) for k, v in resumed.base_params.items())
    manifest = json.loads((resumed.path / "manifest.json").read_text())
    assert manifest["runs"][-1]["chunks_written"] == [1, 2]


def test_lds_checks_shape_and_model(tmp_path):
    data = tiny_data()
    gt = build_fn(tmp_path)
    scores = torch.randn(12, 80, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    base = gt.base_model(data)
    res = gt.lds(scores, model=base, num_bootstrap=0)
    assert res.mean == gt.lds(scores, model=gt.base_fingerprint, num_bootstrap=0).mean
    with pytest.raises(ValueError, match=r"\(12, 80\).*transpose"):
        gt.lds(scores.T)
    with pytest.raises(ValueError, match="another architecture"):
        gt.lds(scores, model=wide_factory())
    with pytest.raises(ValueError, match="other weights"):
        gt.lds(scores, model=factory())  # the untrained model
    mlp = make_mlp(64, 10, depth=1, width=8, dtype=torch.float64)
    with pytest.raises(ValueError, match="another architecture"):
        gt.lds(scores, model=mlp)


def test_refused_before_any_work(tmp_path):
    data = tiny_data()
    with pytest.raises(ValueError, match="depth, width describe the library's MLP"):
        GroundTruthConfig(model=factory, depth=2, width=16)
    with pytest.raises(ValueError, match="pass a factory"):
        GroundTruthConfig(model=factory(), vary_init=True)
    with pytest.raises(ValueError, match="recipe .* unused with train_fn"):
        GroundTruthConfig(model=factory, train_fn=adam_loop, recipe=TrainingRecipe(epochs=3))
    with pytest.raises(ValueError, match="matched_steps"):
        GroundTruthConfig(model=factory, train_fn=adam_loop, matched_steps=True)
    with pytest.raises(TypeError, match="train_fn must be a function"):
        GroundTruthConfig(train_fn=3)
    calls = iter(range(100))

    def drifting() -> nn.Module:
        torch.manual_seed(next(calls))  # ignores the seed it runs under
        return SmallNet().double()

    with pytest.raises(ValueError, match="different initial weights in two calls"):
        ground_truth(data, GroundTruthConfig(model=drifting), tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # nothing written
    bad = GroundTruthConfig(model=factory, train_fn=lambda m, X, y, s: None, num_subsets=2,
                            num_seeds=1)  # fmt: skip
    with pytest.raises(TypeError, match="must return the trained nn.Module"):
        ground_truth(data, bad, tmp_path, progress=False)


def test_train_fn_runs_in_parallel_processes_with_the_same_numbers(tmp_path):
    """``executor=LocalExecutor(workers=2)``: the chunks of a user's ``train_fn`` train in two
    spawned processes (one torch thread each), and the store equals the sequential one."""
    from curvinf.executors import LocalExecutor

    data = tiny_data()
    one = ground_truth(data, fn_config(), tmp_path / "one", progress=False, models_per_chunk=2)
    two = ground_truth(
        data,
        fn_config(),
        tmp_path / "two",
        progress=False,
        models_per_chunk=2,
        executor=LocalExecutor(workers=2, threads=1),
    )
    assert two.manifest["layout"]["num_chunks"] == 3
    assert torch.equal(one.measurements, two.measurements)


def test_a_train_fn_worker_processes_cannot_import_is_refused_before_any_work(tmp_path):
    from curvinf.executors import LocalExecutor

    def local_loop(model, X, y, seed):
        return model

    config = GroundTruthConfig(model=factory, train_fn=local_loop, num_subsets=3, num_seeds=1)
    with pytest.raises(ValueError, match="train_fn=.*local_loop cannot be sent.*module level"):
        ground_truth(tiny_data(), config, tmp_path, executor=LocalExecutor(workers=2))
    assert not any(tmp_path.iterdir())
