"""Audio encoder: the Whisper-style megatron encoder vs transformers' WhisperEncoder (same random
weights, fp32), variable-length padding, the one length rule, the connector and the SANM encoder."""

import pytest
import torch

from megatron_omni.convert.mcore_io import megatron_world
from megatron_omni.models.audio import AudioConfig, WhisperStyleEncoder, audio_token_count, encoder_frame_count
from megatron_omni.models.audio.hf_whisper import load_hf_whisper_encoder

whisper_hf = pytest.importorskip("transformers.models.whisper.modeling_whisper")
from transformers import WhisperConfig  # noqa: E402

MELS, D, LAYERS, HEADS, FFN, POS = 16, 64, 2, 4, 128, 50  # 100 input frames


def _cfg(**kw):
    base = dict(num_mel_bins=MELS, d_model=D, num_layers=LAYERS, num_attention_heads=HEADS, ffn_hidden_size=FFN,
                max_source_positions=POS, downsample_factor=4, out_hidden_size=96, connector_hidden_size=80)
    base.update(kw)
    return AudioConfig(**base)


@pytest.fixture(scope="module")
def world():
    with megatron_world():
        yield


@pytest.fixture(scope="module")
def pair(world):
    torch.manual_seed(0)
    hf_cfg = WhisperConfig(num_mel_bins=MELS, d_model=D, encoder_layers=LAYERS, encoder_attention_heads=HEADS,
                           encoder_ffn_dim=FFN, max_source_positions=POS, dropout=0.0, attention_dropout=0.0,
                           activation_dropout=0.0, activation_function="gelu")
    hf_cfg._attn_implementation = "eager"
    hf = whisper_hf.WhisperEncoder(hf_cfg).float().eval()
    with torch.no_grad():  # non-trivial biases / norms / positions, so every mapping is exercised
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "layer_norm" in n or "embed_positions" in n:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm.weight" in n else 0.0))
    ours = WhisperStyleEncoder(_cfg()).eval()
    load_hf_whisper_encoder(ours, hf.state_dict())
    return hf, ours


def test_matches_hf_whisper_encoder(pair):
    hf, ours = pair
    x = torch.randn(3, MELS, 2 * POS)
    with torch.no_grad():
        ref = hf(x).last_hidden_state
        got, lengths = ours.encode(x)
    assert got.shape == ref.shape and lengths.tolist() == [POS] * 3
    delta = (got - ref).abs().max().item()
    print(f"max|delta| vs HF WhisperEncoder: {delta:.3e}")
    assert delta <= 1e-5
    assert (ref - ref.mean()).abs().max() > 0.1  # not a degenerate comparison
    with torch.no_grad():  # and a single wrong weight is seen
        hf.layers[1].self_attn.k_proj.weight[0, 0] += 0.1
        assert (hf(x).last_hidden_state - got).abs().max() > 1e-4
        hf.layers[1].self_attn.k_proj.weight[0, 0] -= 0.1


def test_key_bias_is_zero_and_stays_zero(pair):
    _, ours = pair
    assert ours.key_bias_max_abs() == 0.0
    bias = ours.decoder.layers[0].self_attention.linear_qkv.bias
    q_before = bias.detach().clone()
    x = torch.randn(2, MELS, 40)
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    tokens, _ = ours(x, torch.tensor([40, 23]))
    tokens.square().mean().backward()
    g = bias.grad.view(HEADS, 3, D // HEADS)
    assert g[:, 1].abs().max() == 0 and g[:, 0].abs().max() > 0
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert ours.key_bias_max_abs() == 0.0
    assert not torch.equal(q_before, bias.detach())  # q/v biases did train (the later tests reload HF weights)


@pytest.fixture()
def fresh_pair(pair):
    hf, ours = pair
    load_hf_whisper_encoder(ours, hf.state_dict())
    return hf, ours


@pytest.mark.parametrize("lengths", [[100, 57, 1, 2, 3, 64], [31, 100, 8]])
def test_padded_batch_equals_per_clip(fresh_pair, lengths):
    _, ours = fresh_pair
    torch.manual_seed(1)
    clips = [torch.randn(MELS, n) for n in lengths]
    N = max(lengths)
    batch = torch.stack([torch.nn.functional.pad(c, (0, N - c.shape[1]), value=7.0) for c in clips])  # junk pad
    with torch.no_grad():
        tokens, tlen = ours(batch, torch.tensor(lengths))
        hid, elen = ours.encode(batch, torch.tensor(lengths))
        assert tlen.tolist() == [audio_token_count(n, ours.audio) for n in lengths]
        assert tokens.shape == (sum(tlen.tolist()), 96)
        for i, (c, part) in enumerate(zip(clips, tokens.split(tlen.tolist()))):
            alone, alen = ours(c[None])
            assert alen.tolist() == [tlen[i].item()]
            torch.testing.assert_close(part, alone, rtol=0, atol=1e-5)
            h1, _ = ours.encode(c[None])
            torch.testing.assert_close(hid[i, : elen[i]], h1[0], rtol=0, atol=1e-5)


def test_token_count_rule(fresh_pair):
    _, ours = fresh_pair
    a = ours.audio
    for n in [1, 2, 3, 7, 8, 9, 15, 16, 17, 63, 64, 99, 100]:
        with torch.no_grad():
            tokens, tlen = ours(torch.randn(1, MELS, n))
            hid, elen = ours.encode(torch.randn(1, MELS, n))
        assert hid.shape[1] == elen.item() == encoder_frame_count(n, a) == -(-n // 2)
        assert tokens.shape[0] == tlen.item() == audio_token_count(n, a) == -(-n // 8)
    t = torch.tensor([0, 1, 8, 9, 100])
    assert audio_token_count(t, a).tolist() == [audio_token_count(int(v), a) for v in t]
    with pytest.raises(ValueError):
        ours(torch.randn(1, MELS, 2 * POS + 1))


def test_connector_shape_and_k1(world):
    m = WhisperStyleEncoder(_cfg(downsample_factor=1, out_hidden_size=24, connector_hidden_size=None))
    with torch.no_grad():
        tokens, tlen = m(torch.randn(2, MELS, 30), torch.tensor([30, 11]))
    assert tlen.tolist() == [15, 6] and tokens.shape == (21, 24)


def test_yaml_configs():
    tiny = AudioConfig.from_yaml("configs/model/audio_tiny.yaml")
    large = AudioConfig.from_yaml("configs/model/audio_whisper_large.yaml")
    assert large.num_mel_bins == 128 and large.d_model == 1280 and large.num_layers == 32
    assert audio_token_count(3000, large) == 1500 // large.downsample_factor
    assert tiny.d_model % tiny.num_attention_heads == 0


# ------------------------------------------------------------------------------- SANM (Paraformer)


def _sanm_cfg():
    return AudioConfig(encoder_type="sanm", num_mel_bins=8, d_model=32, num_layers=3, num_attention_heads=4,
                       ffn_hidden_size=64, max_source_positions=40, lfr_m=7, lfr_n=6, sanm_kernel_size=5,
                       downsample_factor=2, out_hidden_size=48)


def _naive_lfr(x, m, n):
    """x [C, L] -> [ceil(L/n), m*C]: left-pad (m-1)//2 copies of frame 0, windows past the end repeat the last."""
    L = x.shape[1]
    frames = [x[:, 0]] * ((m - 1) // 2) + [x[:, t] for t in range(L)]
    out = []
    for i in range(-(-L // n)):
        win = [frames[min(i * n + j, len(frames) - 1)] for j in range(m)]
        out.append(torch.cat(win))
    return torch.stack(out)


def test_lfr_stack_matches_naive():
    from megatron_omni.models.audio import lfr_stack

    torch.manual_seed(0)
    lengths = [1, 5, 6, 7, 13, 30]
    x = torch.randn(len(lengths), 3, 30)
    got = lfr_stack(x, torch.tensor(lengths), 7, 6)
    for i, L in enumerate(lengths):
        ref = _naive_lfr(x[i, :, :L], 7, 6)
        assert encoder_frame_count(L, _sanm_cfg()) == ref.shape[0]
        torch.testing.assert_close(got[i, : ref.shape[0]], ref, rtol=0, atol=0)


def test_sanm_lengths_and_padding(world):
    from megatron_omni.models.audio import build_audio_encoder

    torch.manual_seed(0)
    cfg = _sanm_cfg()
    m = build_audio_encoder(cfg).eval()
    lengths = [240, 1, 6, 7, 100, 173]
    clips = [torch.randn(8, n) for n in lengths]
    batch = torch.stack([torch.nn.functional.pad(c, (0, 240 - c.shape[1]), value=-3.0) for c in clips])
    with torch.no_grad():
        tokens, tlen = m(batch, torch.tensor(lengths))
        hid, elen = m.encode(batch, torch.tensor(lengths))
        assert elen.tolist() == [encoder_frame_count(n, cfg) for n in lengths] == [-(-n // 6) for n in lengths]
        assert tlen.tolist() == [audio_token_count(n, cfg) for n in lengths] == [-(-n // 12) for n in lengths]
        assert tokens.shape == (sum(tlen.tolist()), 48)
        for i, (c, part) in enumerate(zip(clips, tokens.split(tlen.tolist()))):
            alone, alen = m(c[None])
            assert alen.item() == tlen[i].item() == alone.shape[0]
            torch.testing.assert_close(part, alone, rtol=0, atol=1e-5)
            h1, _ = m.encode(c[None])
            torch.testing.assert_close(hid[i, : elen[i]], h1[0], rtol=0, atol=1e-5)
        with pytest.raises(ValueError):
            m(torch.randn(1, 8, 241))


@pytest.mark.parametrize("encoder_type", ["whisper", "sanm"])
def test_recompute_gives_the_same_gradients_and_keeps_fewer_activations(world, encoder_type):
    """`recompute: true` changes what the backward keeps, not the gradients."""
    import dataclasses

    from megatron_omni.models.audio import build_audio_encoder

    base = _cfg(num_layers=4) if encoder_type == "whisper" else dataclasses.replace(_sanm_cfg(), num_layers=4)
    mels = base.num_mel_bins
    lengths = torch.tensor([100, 61])
    feats = torch.randn(2, mels, 100, generator=torch.Generator().manual_seed(5))
    grads, saved, weights = {}, {}, None
    for recompute in (False, True):
        enc = build_audio_encoder(dataclasses.replace(base, recompute=recompute)).train()
        if weights is None:
            weights = enc.state_dict()
        enc.load_state_dict(weights)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            tokens, _ = enc(feats, lengths)
        tokens.square().mean().backward()
        grads[recompute] = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
        saved[recompute] = sum(kept)
    assert grads[True].keys() == grads[False].keys() and len(grads[False]) > 10
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=0, atol=1e-6, msg=name)
    assert saved[True] < 0.6 * saved[False], saved


# ------------------------------------------------------------------------------- tensor parallel

_COLUMN = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias")
_ROW = ("linear_proj.weight", "linear_fc2.weight")


def _tp_shard(name, t, rank, tp):
    if name.endswith(_COLUMN):
        return t.chunk(tp, dim=0)[rank]
    if name.endswith(_ROW):
        return t.chunk(tp, dim=1)[rank]
    return t


def _tp_worker(path):
    """torchrun --nproc_per_node 2 tests/models/test_audio_encoder.py IO.pt: TP2 forward of saved weights."""
    import torch.distributed as dist

    from megatron_omni.config.schema import ParallelConfig
    from megatron_omni.parallel.initialize import destroy_distributed, initialize_distributed, set_random_seeds

    io = torch.load(path)
    initialize_distributed(ParallelConfig(tp=2, backend="gloo"))
    set_random_seeds(0)
    rank = dist.get_rank()
    m = WhisperStyleEncoder(_cfg()).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(_tp_shard(n, io["state"][n], rank, 2))
        tokens, tlen = m(io["x"], io["lengths"])
        hid, elen = m.encode(io["x"], io["lengths"])
    if rank == 0:
        torch.save({"tokens": tokens, "tlen": tlen, "hid": hid}, path + ".out")
    destroy_distributed()


def test_tp2_equals_tp1(world, tmp_path):
    from tests.helpers.launch import torchrun

    torch.manual_seed(3)
    m = WhisperStyleEncoder(_cfg()).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    m.zero_key_bias_()
    x, lengths = torch.randn(3, MELS, 90), torch.tensor([90, 41, 7])
    with torch.no_grad():
        tokens, tlen = m(x, lengths)
        hid, elen = m.encode(x, lengths)
    io = str(tmp_path / "io.pt")
    torch.save({"state": {n: p.detach() for n, p in m.named_parameters()}, "x": x, "lengths": lengths}, io)
    torchrun(2, ["tests/models/test_audio_encoder.py", io], timeout=300)
    out = torch.load(io + ".out")
    assert out["tlen"].tolist() == tlen.tolist()
    valid = torch.arange(hid.shape[1])[None, :] < elen[:, None]
    torch.testing.assert_close(out["hid"][valid], hid[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["tokens"], tokens, rtol=0, atol=1e-5)


if __name__ == "__main__":
    import sys

    _tp_worker(sys.argv[1])


@pytest.mark.parametrize("encoder_type", ["whisper", "sanm"])
def test_encoders_read_nothing_back_from_the_device(world, encoder_type):
    """Training keeps the media size metadata on the host; the encoders must plan every shape and mask
    from it.  On the meta device any read of device data (`.item()`, `bool()`, boolean-mask indexing:
    a host sync per microbatch on a GPU) raises, so this forward runs only if there is none."""
    import dataclasses

    from megatron_omni.models.audio import build_audio_encoder
    from megatron_omni.models.vision.encoder import NaViTEncoder, VisionConfig
    from tests.models.test_vision_encoder import GRID, TINY

    cfg = _cfg(num_layers=2) if encoder_type == "whisper" else dataclasses.replace(_sanm_cfg(), num_layers=2)
    audio = build_audio_encoder(cfg).to("meta")
    lengths = torch.tensor([40, 7, 23])  # host, as in training: clips padded to 40 frames
    tokens, token_lengths = audio(torch.empty(3, cfg.num_mel_bins, 40, device="meta"), lengths)
    assert token_lengths.device.type == "cpu"
    assert token_lengths.tolist() == [audio_token_count(n, cfg) for n in lengths.tolist()]
    assert tokens.shape == (sum(token_lengths.tolist()), cfg.out_hidden_size)

    vision_cfg = VisionConfig.from_yaml(str(TINY))
    vision = NaViTEncoder(vision_cfg).to("meta")
    out = vision(torch.empty(int(GRID.prod(-1).sum()), vision_cfg.patch_dim, device="meta"), GRID)
    assert out.shape == (int(GRID.prod(-1).sum()) // vision_cfg.spatial_merge_size ** 2, vision_cfg.out_hidden_size)
