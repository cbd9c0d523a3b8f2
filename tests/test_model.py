from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from simclr_path.errors import SimclrPathError
from simclr_path.model import create_backbone, load_encoder, output_stride, save_encoder


def test_encoder_roundtrip_gives_identical_features(tmp_path):
    torch.manual_seed(0)
    m = create_backbone("resnet18").eval()
    save_encoder(m, tmp_path / "encoder.pt", "resnet18", image_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), load_encoder(tmp_path / "encoder.pt")(x))
        assert torch.equal(m(x), load_encoder(tmp_path)(x))


def test_local_weights_file_is_used(tmp_path):
    src = create_backbone("resnet18")
    torch.save(src.state_dict(), tmp_path / "w.pt")
    m = create_backbone("resnet18", weights=tmp_path / "w.pt")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), m.state_dict().values()))


def test_weights_of_a_smaller_architecture_are_refused(tmp_path):
    # resnet18's tensors all exist in resnet34, which has more blocks: those would stay random
    torch.save(create_backbone("resnet18").state_dict(), tmp_path / "w.pt")
    with pytest.raises(SimclrPathError, match=r"w.pt: weights do not match timm model 'resnet34' "
                                              r"\(\d+ of \d+ tensors missing, first: layer"):
        create_backbone("resnet34", weights=tmp_path / "w.pt")
    # a classifier in the file is ignored, and so is a missing BN step counter
    sd = create_backbone("resnet18").state_dict()
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    sd["fc.weight"] = torch.zeros(10, 512)
    torch.save(sd, tmp_path / "w2.pt")
    create_backbone("resnet18", weights=tmp_path / "w2.pt")


def test_weights_of_a_deeper_architecture_are_refused(tmp_path):
    # resnet18's tensors all exist in resnet34's file: loading them would build a resnet18 out
    # of resnet34's first blocks
    torch.save(create_backbone("resnet34").state_dict(), tmp_path / "w.pt")
    with pytest.raises(SimclrPathError, match=r"w.pt: weights do not match timm model 'resnet18' "
                                              r"\(\d+ unexpected, first: layer1.2"):
        create_backbone("resnet18", weights=tmp_path / "w.pt")
    # timm's own file with its classifier (another class count) loads: only that is left out
    import timm

    torch.save(timm.create_model("resnet18", num_classes=7).state_dict(), tmp_path / "full.pt")
    create_backbone("resnet18", weights=tmp_path / "full.pt")


def test_a_checkpoint_of_timms_training_script_loads(tmp_path):
    import argparse

    import timm

    full = timm.create_model("resnet18", num_classes=3)
    # timm's CheckpointSaver: the state dict beside the run's arguments as a Namespace
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": full.state_dict(), "version": 2,
                "args": argparse.Namespace(lr=0.1, model="resnet18"), "metric": 70.1},
               tmp_path / "model_best.pth.tar")
    m = create_backbone("resnet18", weights=tmp_path / "model_best.pth.tar")
    assert torch.equal(m.conv1.weight, full.conv1.weight)


def test_timm_names_with_a_weights_tag_are_accepted():
    assert create_backbone("resnet18.a1_in1k").num_features == 512


def test_unknown_arch_suggests_names():
    with pytest.raises(SimclrPathError, match="did you mean resnet18"):
        create_backbone("resnet181")


def test_corrupt_encoder_fails_clearly(tmp_path):
    (tmp_path / "encoder.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SimclrPathError, match="cannot read"):
        load_encoder(tmp_path / "encoder.pt", arch="resnet18")


@pytest.mark.parametrize("layers", [0, 1, 2, 3])
def test_projection_head_depths(layers, tmp_path):
    from simclr_path.model import (
        ProjectionHead,
        SimCLRModel,
        load_projection_head,
        save_projection_head,
    )

    head = ProjectionHead(512, hidden_dim=64, out_dim=16, layers=layers, batchnorm=True)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in head.modules())
    n_bn = sum(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules())
    assert n_linear == layers and n_bn == max(0, layers - 1)
    model = SimCLRModel(create_backbone("resnet18"), head)
    h, z = model(torch.randn(4, 3, 32, 32))
    assert h.shape == (4, 512) and z.shape == (4, 512 if layers == 0 else 16)
    assert head.out_dim == z.shape[1]
    # round trip through a run directory (encoder.json records the head)
    save_encoder(model.backbone, tmp_path / "encoder.pt", "resnet18", image_size=32, head=head.config())
    save_projection_head(head, tmp_path / "head.pt")
    head.eval()
    again = load_projection_head(tmp_path)
    assert not again.training
    with torch.no_grad():
        assert torch.equal(again(h), head(h))


def test_projection_head_without_batchnorm_and_missing_head(tmp_path):
    from simclr_path.model import ProjectionHead, load_projection_head

    head = ProjectionHead(8, out_dim=4, layers=3, batchnorm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules())
    save_encoder(create_backbone("resnet18"), tmp_path / "encoder.pt", "resnet18")
    with pytest.raises(SimclrPathError, match="no projection head recorded"):
        load_projection_head(tmp_path)


def test_simclr_model_takes_batches_of_other_sizes():
    from simclr_path.config import ModelConfig
    from simclr_path.model import create_simclr_model

    torch.manual_seed(0)
    m = create_simclr_model(ModelConfig(arch="resnet18")).eval()
    x, small = torch.randn(2, 3, 32, 32), torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        h, z = m(x, small)
        assert h.shape == (6, m.backbone.num_features) and z.shape[0] == 6
        assert torch.allclose(h[:2], m.backbone(x), atol=1e-6)
        assert torch.allclose(h[2:], m.backbone(small), atol=1e-6)
        assert torch.allclose(z, m.head(h), atol=1e-6)


@pytest.mark.parametrize("arch", ["mobilenetv3_small_050", "resnet18"])
def test_heads_take_the_width_the_backbone_outputs(arch, tmp_path):
    # MobileNetV3 has a layer after its pooling: 1024 outputs from 288 num_features
    from simclr_path.config import ModelConfig
    from simclr_path.finetune import FinetuneModel
    from simclr_path.model import create_simclr_model, encoder_info, feature_dim, save_encoder

    m = create_simclr_model(ModelConfig(arch=arch)).eval()
    with torch.no_grad():
        h, z = m(torch.randn(2, 3, 64, 64))
        assert h.shape == (2, feature_dim(m.backbone)) and z.shape == (2, 128)
        assert FinetuneModel(m.backbone, 3)(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    save_encoder(m.backbone, tmp_path / "encoder.pt", arch)
    assert encoder_info(tmp_path / "encoder.pt")["num_features"] == h.shape[1]


def test_output_stride_from_timm_feature_info():
    assert output_stride(create_backbone("resnet18")) == 32
    assert output_stride(torch.nn.Conv2d(3, 8, 3)) is None  # a model that does not say


def test_encoder_json_that_is_not_an_object_is_one_clear_error(tmp_path):
    from simclr_path.errors import SimclrPathError
    from simclr_path.model import encoder_info

    (tmp_path / "encoder.pt").write_bytes(b"")
    (tmp_path / "encoder.json").write_text("[1, 2]")
    with pytest.raises(SimclrPathError, match="encoder.json: expected a JSON object"):
        encoder_info(tmp_path / "encoder.pt")
    for meta in ('{"image_size": 96}', '{"arch": 5}', '{"arch": " "}'):
        (tmp_path / "encoder.json").write_text(meta)
        with pytest.raises(SimclrPathError, match="encoder.json: no model name"):
            encoder_info(tmp_path / "encoder.pt")
    # a newer format is refused, as stores and model.json are (it was used in silence: review)
    (tmp_path / "encoder.json").write_text('{"arch": "resnet18", "format_version": 99}')
    with pytest.raises(SimclrPathError, match=r"encoder.json: encoder format 99 is newer than "
                                              r"this simclr-path's \(1\); upgrade"):
        encoder_info(tmp_path / "encoder.pt")
    (tmp_path / "encoder.json").write_text('{"arch": "resnet18", "format_version": "1"}')
    with pytest.raises(SimclrPathError, match="format_version '1' is not a version number"):
        encoder_info(tmp_path / "encoder.pt")


def test_a_simclr_checkpoint_as_weights_loads_its_backbone(tmp_path):
    # train.py's checkpoint: {"model": SimCLRModel state (backbone.*, head.*), "step": ...}
    from simclr_path.model import ProjectionHead, SimCLRModel

    torch.manual_seed(0)
    sm = SimCLRModel(create_backbone("resnet18"), ProjectionHead(512, out_dim=16))
    torch.save({"format_version": 1, "step": 3, "model": sm.state_dict()}, tmp_path / "ck.pt")
    m = create_backbone("resnet18", weights=tmp_path / "ck.pt")
    assert all(torch.equal(a, b) for a, b in
               zip(sm.backbone.state_dict().values(), m.state_dict().values()))
    # the same prefixes in an encoder file (a DDP-wrapped save) load too
    torch.save({f"module.{k}": v for k, v in sm.backbone.state_dict().items()},
               tmp_path / "encoder.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(sm.backbone.eval()(x), load_encoder(tmp_path / "encoder.pt", "resnet18")(x))


def test_an_encoder_of_another_arch_names_the_tensors(tmp_path):
    torch.save(create_backbone("resnet18").state_dict(), tmp_path / "encoder.pt")
    with pytest.raises(SimclrPathError, match=r"encoder.pt: encoder does not match timm model "
                                              r"'resnet34' \(\d+ of \d+ tensors missing, first: "
                                              r"layer1\.2\.conv1\.weight\)"):
        load_encoder(tmp_path / "encoder.pt", arch="resnet34")
    sd = create_backbone("resnet18").state_dict()
    sd["extra.weight"] = torch.zeros(1)
    sd["fc.weight"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "encoder.pt")
    with pytest.raises(SimclrPathError, match=r"2 unexpected, first: extra\.weight"):
        load_encoder(tmp_path / "encoder.pt", arch="resnet18")
    sd = create_backbone("resnet18").state_dict()
    sd["conv1.weight"] = torch.zeros(8, 3, 7, 7)
    torch.save(sd, tmp_path / "encoder.pt")
    with pytest.raises(SimclrPathError, match=r"1 of other shapes, first: conv1\.weight "
                                              r"\(8, 3, 7, 7\) vs \(64, 3, 7, 7\)"):
        load_encoder(tmp_path / "encoder.pt", arch="resnet18")


@pytest.mark.parametrize("kind", ["pickled_model", "json", "truncated"])
def test_a_file_that_is_no_state_dict_is_one_line_without_torchs_advice(kind, tmp_path):
    p = tmp_path / "w.pt"
    if kind == "pickled_model":
        torch.save(torch.nn.Linear(2, 2), p)
    elif kind == "json":
        p.write_text('{"arch": "resnet18"}')
    else:
        torch.save(create_backbone("resnet18").state_dict(), p)
        p.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(SimclrPathError) as e:
        create_backbone("resnet18", weights=p)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "\x1b" not in msg and "weights_only" not in msg
    if kind == "truncated":
        assert "truncated or damaged" in msg
    else:
        assert "not a state dict of tensors" in msg and "save model.state_dict() with torch.save" in msg


@pytest.mark.parametrize("arch", ["regnetx_004", "resnet18"])
def test_sync_batchnorm_keeps_every_activation(arch):
    """DDP's synchronised batch norm computes what the model computed: timm's fused batch-norm +
    activation layers (RegNet) keep their activation (torch's converter drops it, 0.17 off)."""
    from simclr_path.config import ModelConfig
    from simclr_path.model import create_simclr_model, sync_batchnorm

    torch.manual_seed(0)
    model = create_simclr_model(ModelConfig(arch=arch)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model.backbone(x)
        synced = sync_batchnorm(model).eval()
        n_sync = sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
        got = synced.backbone(x)
    assert n_sync > 0 and not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    torch.testing.assert_close(got, want)
    assert set(synced.state_dict()) == set(model.state_dict())


# ---- batch norm over the global batch on CPU processes (gloo) ----
def _bn_net():
    """conv -> BatchNorm2d -> timm's BatchNormAct2d -> pool -> linear -> BatchNorm1d -> linear."""
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), BatchNormAct2d(6),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 8),
        torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 5))


def _bn_views():
    g = torch.Generator().manual_seed(1)
    # per-image offsets: each process's half of the batch has other statistics than the whole
    off = torch.linspace(-2, 2, 8).view(8, 1, 1, 1)
    return torch.randn(8, 3, 9, 9, generator=g) + off, torch.randn(8, 3, 9, 9, generator=g) + off


def _bn_step(net, v1, v2):
    from simclr_path.loss import NTXentLoss

    z = net(torch.cat([v1, v2]))  # both views in one batch, as SimCLRModel's forward
    loss = NTXentLoss(0.5)(z[: len(v1)], z[len(v1):])
    loss.backward()
    return loss


def _bn_worker(rank: int, world: int, init_file: str, out_file: str, convert: bool) -> None:
    import torch.distributed as dist

    from simclr_path.model import global_batchnorm

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # torch.distributed.nn.functional.all_reduce warned of its deprecation in every process
    warnings.simplefilter("error", FutureWarning)
    try:
        net = _bn_net()
        if convert:
            net, others = global_batchnorm(net)
            assert others == 0
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        v1, v2 = _bn_views()
        sl = slice(rank * 4, rank * 4 + 4)
        loss = _bn_step(ddp, v1[sl], v2[sl]).detach()
        dist.all_reduce(loss)
        if rank == 0:
            torch.save({"loss": loss / world,
                        "grad": torch.cat([p.grad.flatten() for p in net.parameters()]),
                        "state": {k: v.clone() for k, v in net.state_dict().items()}}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("convert", [True, False])
def test_two_gloo_processes_normalise_over_the_global_batch_as_one_process(tmp_path, convert):
    """nn.SyncBatchNorm runs on CUDA only: two CPU processes normalised over their own half of
    the batch, and trained another objective than one process on the same global batch."""
    import torch.multiprocessing as mp

    out = tmp_path / "bn.pt"
    mp.spawn(_bn_worker, args=(2, str(tmp_path / "init"), str(out), convert), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    net = _bn_net()
    loss = _bn_step(net, *_bn_views())
    grad = torch.cat([p.grad.flatten() for p in net.parameters()])
    same = (abs(got["loss"].item() - loss.item()) < 1e-5
            and torch.allclose(got["grad"], grad, atol=1e-5, rtol=1e-4))
    assert same == convert, (got["loss"].item(), loss.item())
    if convert:  # running statistics and state-dict keys as one process's
        state = net.state_dict()
        assert got["state"].keys() == state.keys()
        for k in state:
            assert torch.allclose(got["state"][k].float(), state[k].float(), atol=1e-5), k


def test_global_batchnorm_is_plain_batch_norm_in_one_process_and_in_eval():
    from timm.layers import BatchNormAct2d

    from simclr_path.config import load_config
    from simclr_path.model import create_simclr_model, global_batchnorm

    ref, net = _bn_net(), _bn_net()
    net, others = global_batchnorm(net)
    assert others == 0 and isinstance(net[2], BatchNormAct2d)  # still the timm layer
    x = _bn_views()[0]
    assert torch.equal(net(x), ref(x))  # training mode, not distributed
    net.eval(), ref.eval()
    assert torch.equal(net(x), ref(x))
    # the ResNet and RegNet SimCLR models: every batch-norm layer converted
    for arch in ("resnet18", "regnetx_002"):
        cfg = load_config(overrides={"model": {"arch": arch}}).model
        assert global_batchnorm(create_simclr_model(cfg))[1] == 0


@pytest.mark.parametrize(("key", "value"), [("image_size", "abc"), ("image_size", 100000),
                                            ("crop_scale", 5), ("crop_scale", [0, 1]),
                                            ("patch_size", "x"), ("mpp", "fast")])
def test_crafted_encoder_metadata_is_one_line_not_a_traceback(tmp_path, key, value):
    """embed computed with these keys as they were: a text image_size was a ValueError deep
    inside, a huge one allocated gigabytes (security review)."""
    import json

    from simclr_path.model import encoder_info

    (tmp_path / "encoder.pt").write_bytes(b"")
    (tmp_path / "encoder.json").write_text(json.dumps({"arch": "resnet18", key: value}))
    with pytest.raises(SimclrPathError, match=rf"encoder.json: {key} .* is not"):
        encoder_info(tmp_path / "encoder.pt")
