"""The method registry's conformance suite: every registered method passes it by being registered.

Parametrized over `methods.names()`: settings from the schema, output shapes and capabilities,
state-dict round trip through the model card, exact resume after a stop, phase freezing, and
the predictions contract. A toy method, written here and registered by this module (never
shipped), shows what adding a method takes: one class and one `register` call.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SCHEMA
from deepssm_workflow import methods
from deepssm_workflow.cli import build_parser
from deepssm_workflow.config import schema
from deepssm_workflow.engine import EngineSettings, optional_inputs, train
from deepssm_workflow.holdout import split_by_source
from deepssm_workflow.inference import codes, decode, load_trained, predict
from deepssm_workflow.shape_space import ShapeSpace

SHAPE, M, N_REAL = (12, 10, 14), 20, 8


# -- the toy: image -> mean shape + a linear map of the image's 2x2x2 block means


@dataclass(frozen=True)
class ToySettings:
    epochs: int
    lr: float


class ToyNet(nn.Module):
    def __init__(self, n_points: int, mean: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(-1))
        self.head = nn.Linear(8, 3 * n_points)

    def forward(self, images):
        pooled = nn.functional.adaptive_avg_pool3d(images, 2).flatten(1)
        return (self.head(pooled) + self.mean).view(len(images), -1, 3)


class Toy(methods.Method):
    summary = "A toy for the registry's tests."
    Settings = ToySettings
    schema = {"epochs": {"type": "integer", "minimum": 1, "default": 3},
              "lr": {"type": "number", "exclusiveMinimum": 0, "default": 0.01}}
    smoke = {"epochs": 3}

    def build(self, settings, spec):
        return ToyNet(spec.n_points, spec.shape_space.mean)

    def network_config(self, model):
        return {"n_points": len(model.mean) // 3}

    def rebuild(self, network, state):
        return ToyNet(network["n_points"], state["mean"].cpu().numpy())

    def phases(self, settings):
        return [methods.Phase("train", settings.epochs, settings.lr, 0.0)]

    def loss(self, model, settings, phase, batch, state):
        return (model(batch.images) - batch.points).square().mean()

    def predict(self, model, images):
        return model(images)

    def training_mean(self, model):
        return model.mean.cpu().numpy().astype(np.float64).reshape(-1, 3)


TOY = "toy_for_tests"
NAMES = [*methods.names(), TOY]  # the suite covers every registered method, and the toy


@pytest.fixture(scope="module", autouse=True)
def toy_registered_for_this_module():
    methods.register(TOY, Toy(), default=False)
    yield
    methods.unregister(TOY)


# -- data


@pytest.fixture(scope="module")
def data():
    """Shapes that vary along 3 modes, and images that show their first points as blobs."""
    rng = np.random.default_rng(0)
    mean, modes = rng.uniform(3, 9, (M, 3)), rng.normal(0, 1, (3, M, 3))
    source = np.arange(N_REAL)
    scores = rng.normal(0, 1, (2 * N_REAL, 3))
    points = (mean + np.einsum("nk,kmd->nmd", scores, modes)).astype(np.float32)
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    images = np.zeros((len(points), *SHAPE), np.float32)
    masks = np.zeros((len(points), *SHAPE), bool)  # the blobs' cores: what a segmentation task segments
    for i, shape in enumerate(points):
        for x, y, z in shape[:3]:
            squared = (xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2
            images[i] += np.exp(-squared / 4.0)
            masks[i] |= squared < 4.0
    train_idx, val_idx = split_by_source(N_REAL, source, 0.25, seed=0)
    return images, points, train_idx, val_idx, ShapeSpace(n_modes=3).fit(points[train_idx]), masks.astype(np.float32)


def spec(space) -> methods.DataSpec:
    """What the engine builds a network for; the toy images are their own world frame (as in `run`)."""
    return methods.DataSpec(SHAPE, M, space, world_mean=space.mean)


def smoke(name: str):
    return methods.get(name).smoke_settings()


def output_points(name: str) -> int:
    """Points per predicted shape: the correspondences, or a LANDMARKS method's own landmark count."""
    entry = methods.get(name)
    return smoke(name).n_landmarks if entry.has(methods.LANDMARKS) else M


def run(name, data, out, **options):
    images, points, train_idx, val_idx, space, masks = data
    # a method trained on uncropped scans gets the points as both frames: these images are their own world frame
    return train(name, smoke(name), images, points, train_idx, val_idx, space, out,
                 engine=EngineSettings(batch_size=4, val_fraction=0.25), device="cpu", log=lambda _: None,
                 **optional_inputs(name, masks, points), **options)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the suite


@pytest.mark.parametrize("name", NAMES)
def test_settings_come_from_the_schema(name):
    entry = methods.get(name)
    for key, prop in entry.schema()["properties"].items():
        assert "default" in prop, f"{name}.{key} has no default in its schema"
    defaults = entry.settings()
    assert asdict(defaults).keys() == set(entry.method.schema)
    for key, value in entry.fixed.items():
        assert getattr(defaults, key) == value
        with pytest.raises(ValueError, match=f"method {name}: .*{key}"):
            entry.settings({key: value})  # a preset's fixed setting is not in its block
    with pytest.raises(ValueError, match=f"method {name}: .*'no_such_setting'"):
        entry.settings({"no_such_setting": 1})
    # every registered name is a choice of the CLI and a block of the config schema
    assert name in schema(SCHEMA)["$defs"]["methods"]["properties"]
    args = build_parser().parse_args(["train", "--cohort", "c", "--preprocess-dir", "p", "--augmentation-dir", "a",
                                      "--method", name, "--settings", "{}", "--out-dir", "o"])
    assert args.method == name


@pytest.mark.parametrize("name", NAMES)
def test_outputs_and_capabilities(name, data):
    images, points, _, _, space, _ = data
    entry = methods.get(name)
    torch.manual_seed(0)
    model = entry.method.build(smoke(name), spec(space)).eval()
    batch = torch.as_tensor(images[:3]).unsqueeze(1)
    with torch.no_grad():
        predicted = entry.method.predict(model, batch)
    assert predicted.shape == (3, output_points(name), 3) and torch.isfinite(predicted).all()
    if entry.has(methods.CORRESPONDENCES):
        np.testing.assert_allclose(entry.method.training_mean(model), space.mean, atol=1e-4)
    if entry.has(methods.LANDMARKS):  # on the grid, in mm from its first voxel centre (x, y, z)
        extent = (np.array(SHAPE[::-1]) - 1.0)
        assert (predicted >= 0).all() and (predicted <= torch.as_tensor(extent, dtype=predicted.dtype)).all()
    if entry.has(methods.PCA_SCORES) or entry.has(methods.LATENT_CODE):
        from_shapes = codes(entry.method, model, shapes=points[:3])
        from_images = codes(entry.method, model, images=images[:3])
        assert from_shapes.shape[0] == from_images.shape[0] == 3 and from_shapes.shape[1] == from_images.shape[1]
        assert np.isfinite(from_shapes).all() and np.isfinite(from_images).all()
    if entry.has(methods.LATENT_CODE):
        assert decode(entry.method, model, from_shapes).shape == (3, M, 3)
    if entry.has(methods.SCALES):  # nested scales, coarse to fine, the finest being the prediction itself
        with torch.no_grad():
            scales = entry.method.predict_scales(model, batch)
        sizes = [len(indices) for indices, _ in scales]
        assert sizes == sorted(set(sizes)) and sizes[-1] == M and sorted(scales[-1][0]) == list(range(M))
        for (coarse, _), (fine, _) in zip(scales, scales[1:]):
            assert np.array_equal(fine[:len(coarse)], coarse)
        finest_indices, finest = scales[-1]
        torch.testing.assert_close(finest, predicted[:, finest_indices])
    if entry.has(methods.SEGMENTATION):
        with torch.no_grad():
            probability = entry.method.predict_segmentation(model, batch)
        assert probability.shape == (3, *SHAPE) and 0 <= probability.min() and probability.max() <= 1
    if entry.has(methods.LOCALIZES):  # its own alignment takes its scan-frame points to its world ones
        with torch.no_grad():
            found = entry.method.localize(model, batch)
        assert found["local"].shape == (3, M, 3) and found["found"].shape == (3,)
        homogeneous = torch.cat([found["local"], torch.ones(3, M, 1)], -1)
        world = torch.einsum("bij,bmj->bmi", found["image_to_world"], homogeneous)[..., :3]
        torch.testing.assert_close(world, predicted, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_through_the_card(name, data, tmp_path):
    card = run(name, data, tmp_path)
    assert card["method"] == name
    json.dumps(card["network"])  # JSON-able: the card is all a rebuild needs besides model.pt
    trained = load_trained(tmp_path)
    assert trained.entry.name == name
    if name == TOY:  # a card of the format before the registry is refused by name, not half-read
        card = json.loads((tmp_path / "model_card.json").read_text())
        (tmp_path / "old").mkdir()
        (tmp_path / "old" / "model.pt").write_bytes((tmp_path / "model.pt").read_bytes())
        (tmp_path / "old" / "model_card.json").write_text(json.dumps(
            {"variant": name, "model_config": card["network"]}))
        with pytest.raises(ValueError, match="old/model_card.json: not a model card of this version"):
            load_trained(tmp_path / "old")
    images = data[0]
    torch.manual_seed(0)
    again = methods.get(name).method.build(smoke(name), spec(data[4]))
    again.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    with torch.no_grad():
        expected = methods.get(name).method.predict(again.eval(), torch.as_tensor(images[:4]).unsqueeze(1))
    got, seconds = predict(trained.method, trained.model, images[:4], batch_size=4)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert seconds > 0


@pytest.mark.parametrize("name", NAMES)
def test_exact_resume_after_a_stop(name, data, tmp_path):
    run(name, data, tmp_path / "full")
    epochs = sum(p.epochs for p in methods.get(name).method.phases(smoke(name)))
    assert epochs >= 2, f"{name}'s smoke settings must run at least 2 epochs"
    assert run(name, data, tmp_path / "cut", stop_after_epochs=epochs - 1) is None
    assert not (tmp_path / "cut" / "model.pt").exists()
    run(name, data, tmp_path / "cut")
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    assert (tmp_path / "cut" / "log.csv").read_text().count("\n") == epochs + 1


@pytest.mark.parametrize("name", NAMES)
def test_each_phase_trains_only_its_parameters(name, data):
    images, points, train_idx, _, space, masks = data
    entry, settings = methods.get(name), smoke(name)
    torch.manual_seed(0)
    model = entry.method.build(settings, spec(space))
    training = methods.TrainingData(points, train_idx, 4, torch.device("cpu"), masks, {"world": points})
    state = entry.method.prepare(model, settings, training)
    rows = train_idx[:4]
    for phase in entry.method.phases(settings):
        entry.method.begin_phase(model, settings, phase, training, state, log=lambda _: None)
        params = entry.method.trainable(model, phase)
        assert params, f"{name}: phase {phase.name} trains nothing"
        chosen = {id(p) for p in params}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = torch.optim.SGD(params, lr=0.1)
        model.train()
        batch = methods.Batch(rows, torch.as_tensor(points[rows]), lambda: torch.as_tensor(images[rows]).unsqueeze(1),
                              lambda: torch.as_tensor(masks[rows]), {"world": lambda: torch.as_tensor(points[rows])})
        loss = entry.method.loss(model, settings, phase, batch, state)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
        frozen = {n for n, p in model.named_parameters() if id(p) not in chosen}
        assert moved and not moved & frozen, f"{name} phase {phase.name}: moved frozen {sorted(moved & frozen)}"


@pytest.mark.parametrize("name", NAMES)
def test_predictions_contract(name, data, tmp_path):
    """Any image store (array, memmap) in, (n, M, 3) float world points out, one row per image,
    whatever the batch size."""
    run(name, data, tmp_path)
    images = data[0]
    np.save(tmp_path / "images.npy", images)
    trained = load_trained(tmp_path)
    one, _ = predict(trained.method, trained.model, np.load(tmp_path / "images.npy", mmap_mode="r"), batch_size=1)
    many, _ = predict(trained.method, trained.model, images, batch_size=5)
    assert one.shape == many.shape == (len(images), output_points(name), 3) and one.dtype == np.float32
    np.testing.assert_allclose(one, many, atol=1e-4)


def test_the_registry_refuses_a_bad_registration():
    with pytest.raises(ValueError, match="already registered"):
        methods.register("base", Toy())
    with pytest.raises(ValueError, match="must match"):
        methods.register("Bad-Name", Toy())

    class Drifted(Toy):
        schema = {"epochs": {"type": "integer", "default": 1}}  # lr missing from the schema

    with pytest.raises(ValueError, match="schema and Settings disagree on lr"):
        methods.register("drifted", Drifted())
    with pytest.raises(ValueError, match="unknown method 'nope'; registered: base"):
        methods.get("nope")


def test_the_uncropped_baseline_refuses_a_spec_without_world_shapes(data):
    entry = methods.get("base_uncropped")
    with pytest.raises(ValueError, match="base_uncropped needs the training subjects' world particles"):
        entry.method.build(smoke("base_uncropped"), methods.DataSpec(SHAPE, M, data[4]))
