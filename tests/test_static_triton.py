"""Static GPU check of the Triton kernels (scripts/static_triton.py) in CI, no GPU: the
CI subset (bf16, each kernel's first config, the modes most likely to spill) compiled
for sm_90 must not spill in a memory-bound kernel or a conv main loop, and the conv
kernels must not use 64-bit integer division.  Issue 21's Hopper bar (TMA, 4 HGMMA per
K step, 64x128+ HGMMA, SASS per HGMMA, wgmma in flight, no division, >= 96 KB pipeline;
dgrad/wgrad: TMA, <= 48 SASS per HGMMA, no division) is checked per conv variant, every
config, bf16; the variants that miss it are strict xfails naming the figures.  The full
table is benchmarks/static/triton.md (``python scripts/static_triton.py``). The GPU
machine's Triton 3.6 is checked on its committed table (benchmarks/static/triton-3.6,
made by scripts/triton36_check.sh): current with the kernel sources and within the bar."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "static_triton.py")


def _script_module():
    """The script's pure-Python parts (importable only without TRITON_INTERPRET, which
    it refuses: loaded with the flag hidden, nothing compiled)."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        spec = importlib.util.spec_from_file_location("static_triton_check", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
        return mod
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def test_problems_name_spills_and_64bit_division():
    """The check can fail: a spilling memory-bound kernel, a spilling conv and a conv with
    64-bit division are each reported; a clean kernel is not."""
    pytest.importorskip("triton")
    S = _script_module()
    clean = S.Result("bn_apply", "bn_relu", "bf16", "BLOCK=1024", True, registers=40)
    spill = S.Result("bn_apply", "bn_relu", "bf16", "BLOCK=1024", True, registers=255,
                     spill_stores=8, spill_loads=8, hot_spills=2)
    conv = S.Result("conv_wgrad", "wgrad", "bf16", "cfg", False, registers=255,
                    spill_stores=160, spill_loads=152, hot_spills=12, div64=61)
    setup_only = S.Result("bn_stats_partial", "x2", "bf16", "cfg", True, registers=72,
                          spill_stores=12, spill_loads=8, hot_spills=0)
    assert S.problems([setup_only]) == []
    assert S.problems([clean]) == []
    assert len(S.problems([spill])) == 1
    assert len(S.problems([conv])) == 2  # the spills and the 64-bit divisions


def test_sass_hot_loop_parser():
    pytest.importorskip("triton")
    S = _script_module()
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0030*/                   IADD3 R2, R2, 0x10, RZ ;
        /*0040*/              @P0 BRA 0x10 ;
        /*0050*/                   STG.E.64 desc[UR4][R2.64], R4 ;
        /*0060*/                   EXIT ;
    """
    instrs, loops = S.read_sass(sass, "")
    assert loops == [(0x10, 0x40)]
    assert len(S.hot_loop(instrs, loops, r"HGMMA")) == 4
    assert S._width(".E.128") == "128" and S._width(".E") == "32"
    # cp.async and its commit are not 32-bit LDG (the misreading issue 21 found)
    assert S._LDG.findall("LDGSTS.E.BYPASS.LTC128B.128 [R1], desc[UR4][R2.64] ;"
                          "LDGDEPBAR ;") == []
    assert S._width(S._LDGSTS.findall("LDGSTS.E.BYPASS.LTC128B.128 [R1]")[0]) == "128"
    assert S._width(".E.LTC128B") == "32"
    assert S._DEPBAR.findall("WARPGROUP.DEPBAR.LE gsb0, 0x1 ;") == ["0x1"]
    assert S._HGMMA_SHAPE.findall("HGMMA.64x256x16.F32.BF16 R24, gdesc[UR4]") == ["64x256x16"]


def test_flattened_loop_reader():
    """A flattened tile x K loop: the per-tile branches (index math, epilogue: forward
    branches over code with no MMA and no operand load) are left out of the K-step path;
    the loads ahead of the epilogue's store are the overlap; a backward jump over an EXIT
    (a wait's retry returning into the body) is no loop."""
    pytest.importorskip("triton")
    S = _script_module()
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/               @P1 BRA 0x50 ;
        /*0030*/                   I2F.RP R3, R4 ;
        /*0040*/                   MUFU.RCP R3, R3 ;
        /*0050*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R5 ;
        /*0060*/              @!P0 BRA 0x100 ;
        /*0070*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0080*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0090*/               @UP0 UTMALDG.2D [UR8], [UR4] ;
        /*00a0*/              @!P2 BRA 0xd0 ;
        /*00b0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00c0*/                   UTMASTG.2D [UR4], [UR8] ;
        /*00d0*/               @P3 BRA 0x10 ;
        /*00e0*/                   EXIT ;
        /*0100*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R5 ;
        /*0110*/                   BRA 0x70 ;
        /*0120*/                   BRA 0x120;
    """
    instrs, loops = S.read_sass(sass, "")
    assert loops == [(0x10, 0xd0)]  # not (0x70, 0x110): it jumps back over the EXIT
    loop = S.hot_loop(instrs, loops, r"HGMMA", addresses=True)
    path, skipped = S.per_tile_branches(loop)
    assert skipped == {0x30, 0x40, 0xb0, 0xc0}
    assert len(path) == 9 and S.overlaps_epilogue(loop)
    assert not S.overlaps_epilogue([(a, t) for a, t in loop if "UTMALDG" not in t])
    # the TMA load after the store: no overlap
    assert not S.overlaps_epilogue([(0, "UTMASTG.2D [UR4], [UR8]"), (16, "UTMALDG.2D [UR8]")])
    ttgir = """
    %1 = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %z) -> (tensor<f32>) : i32 {
      %2:2 = scf.if %first -> (i32, i32) {
        %3 = arith.divsi %t, %w : i32
        scf.yield %3, %3 : i32, i32
      } else {
        scf.yield %a, %a : i32, i32
      }
      %4 = arith.remsi %i, %c : i32
      %5 = ttng.warp_group_dot %x, %y, %acc : tensor<f32>
      scf.yield %5 : tensor<f32>
    }
    """
    assert S.ttgir_loop_divisions(ttgir) == 1  # the remsi per K step, not the tile's divsi
    ptx = """
$L__BB0_2:
    @%p1 bra $L__BB0_3;
    div.s32 %r1, %r2, %r3;
$L__BB0_3:
    rem.u32 %r4, %r5, %r6;
    wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};
    @%p2 bra $L__BB0_4;
    st.global.v4.b32 [%rd1], {%r1, %r2, %r3, %r4};
$L__BB0_4:
    @%p3 bra $L__BB0_2;
"""
    assert S.ptx_loop_divisions(ptx) == 1


def test_wait_after_a_persistent_tile_loop_is_no_loop():
    """A persistent kernel (wgrad): the K loop inside a tile loop (exited by a predicated
    EXIT at its head), a wait's retry after the tile loop's back edge returning into the
    K loop's middle.
    That jump made (its target, the retry) read as the hot loop -- the K loop's tail,
    the epilogue (here its STG) and the retry, smaller than the K loop: the 64x64 wgrad
    dBN row read 77.0 SASS per HGMMA for its K loop's 97.8."""
    pytest.importorskip("triton")
    S = _script_module()
    sass = """
        /*0000*/                   ISETP.GE.AND P0, PT, R0, c[0x0][0x210], PT ;
        /*0010*/               @P0 EXIT ;
        /*0020*/                   LDS.128 R4, [R2] ;
        /*0030*/                   FFMA R4, R4, R5, R6 ;
        /*0040*/                   FFMA R5, R5, R5, R6 ;
        /*0050*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R5 ;
        /*0060*/              @!P1 BRA 0xc0 ;
        /*0070*/                   HGMMA.64x64x16.F32.BF16 R24, R4, gdesc[UR8].tnspB, R24 ;
        /*0080*/                   IADD3 R2, R2, 0x80, RZ ;
        /*0090*/               @P2 BRA 0x20 ;
        /*00a0*/                   STG.E.128 desc[UR4][R8.64], R24 ;
        /*00b0*/                   BRA 0x0 ;
        /*00c0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R5 ;
        /*00d0*/                   BRA 0x70 ;
        /*00e0*/                   BRA 0xe0;
    """
    instrs, loops = S.read_sass(sass, "")
    assert loops == [(0x20, 0x90), (0x0, 0xb0)], loops  # the K and tile loops, not (0x70, 0xd0)
    body = S.hot_loop(instrs, loops, r"HGMMA")
    assert len(body) == 8 and not any("STG" in t for t in body)


def test_loop_division_readers():
    """Divisions count only inside the innermost loop holding the dot / wgmma."""
    pytest.importorskip("triton")
    S = _script_module()
    ttgir = """
    %0 = arith.divsi %a, %b : i32
    %1 = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %z) -> (tensor<f32>) : i32 {
      %2 = arith.remsi %i, %c : i32
      %3 = ttng.warp_group_dot %x, %y, %acc : tensor<f32>
      scf.yield %3 : tensor<f32>
    }
    %4 = arith.divui %a, %b : i32
    """
    assert S.ttgir_loop_divisions(ttgir) == 1
    assert S.ttgir_loop_divisions(ttgir.replace("ttng.warp_group_dot", "arith.addf")) == 0
    ptx = """
    div.s32 %r1, %r2, %r3;
$L__BB0_2:
    rem.u32 %r4, %r5, %r6;
    div.s64 %rd1, %rd2, %rd3;
    wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};
    @%p1 bra $L__BB0_2;
    rem.s32 %r7, %r8, %r9;
"""
    assert S.ptx_loop_divisions(ptx) == 2


def test_hopper_bar_can_fail():
    """A row with every figure at the bar passes; each figure just past it fails alone."""
    pytest.importorskip("triton")
    S = _script_module()
    good = dict(registers=200, shared=160 * 1024, utmaldg=2, loop_hgmma=8,
                hgmma_shapes={"64x256x16": 8}, sass_per_hgmma=30.0, wgmma_wait=[1],
                stores={"128": 8, "32": 2})
    row = S.Result("conv", "fwd 3x3/1x1 (conv2d)", "bf16", "BLOCK_N=256", False, **good)
    assert S.forward_row(row) and S.hopper_gaps(row) == []
    narrow = S.Result("conv", "fwd 3x3/1x1 (conv2d)", "bf16", "BLOCK_N=64", False,
                      **dict(good, hgmma_shapes={"64x64x16": 8}))
    assert S.hopper_gaps(narrow) == []  # the C_out <= 64 tile: 64x64 is the widest
    for change in (dict(utmaldg=0), dict(loop_hgmma=2), dict(hgmma_shapes={"64x64x16": 8}),
                   dict(sass_per_hgmma=33.0), dict(wgmma_wait=[0]), dict(loop_div=1),
                   dict(loop_calls=1), dict(spill_stores=8), dict(shared=64 * 1024),
                   dict(stores={"128": 4, "16": 8}), dict(stores={"32": 2})):
        bad = S.Result("conv", "fwd 3x3/1x1 (conv2d)", "bf16", "BLOCK_N=256", False,
                       **dict(good, **change))
        assert len(S.hopper_gaps(bad)) == 1, change
    fused = S.Result("conv", "fwd bn-relu prologue +stats", "bf16", "cfg", False,
                     **dict(good, sass_per_hgmma=48.0))
    assert S.hopper_gaps(fused) == []


def test_ci_subset_compiles_for_sm90_without_spills(tmp_path):
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, SCRIPT, "--ci", "--out", str(tmp_path), "--dump",
                           str(tmp_path / "dump")], env=env, capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout[-6000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "triton.json").read_text())
    # --dump: each row's code, files numbered in the table's order; a conv row's hot loop
    # as counted (the K-step path; per-tile branches marked "skip") gives its SASS per HGMMA
    dump = tmp_path / "dump"
    assert len(list(dump.glob("*.ptx"))) == len(report["results"]), out
    for i, r in enumerate(report["results"]):
        if r["memory_bound"] or r["error"]:
            continue
        (loop,) = dump.glob(f"{i:03d}_*.loop.sass")
        path = [t for t in loop.read_text().splitlines() if not t.startswith("skip")]
        assert round(len(path) / sum(" HGMMA." in t for t in path), 1) == \
            r["sass_per_hgmma"], (loop.name, r["sass_per_hgmma"])
    kernels = {r["kernel"] for r in report["results"]}
    assert {"bn_apply", "bn_bwd_apply", "bn_stats_partial", "bn_bwd_reduce_partial",
            "bn_stats_finalize", "bn_bwd_finalize", "conv", "conv_wgrad"} <= kernels, out
    assert all(r["registers"] > 0 for r in report["results"] if not r["error"]), out
    assert report["problems"] == [], out
    assert proc.returncode == 0, out



# The NCHW backward reduction with a mask (BN-add-ReLU, dual), as the launcher specialises
# it: the mask packed in NCHW order, unit position strides; bf16 and fp32, every NCHW
# tile. Under triton 3.6 (the GPU image's) its 2-D mask-byte load took a channel-fast
# layout against the data's position-fast one: dout, x and the bytes converted through
# shared memory every step, 255 registers and spills in the loop (docs/cuda_reductions.md).
_NCHW_MASK_REDUCE = r"""
import json, re, sys
sys.path.insert(0, sys.argv[1])
import static_triton as S
rows = []
for fn, ptrs, consts, warps, stages, meta in S.bn_specs(False):
    if (meta["kernel"] == "bn_bwd_reduce_partial" and consts["HAS_MASK"]
            and meta["variant"].endswith("nchw") and meta["dtype"] in ("bf16", "fp32")):
        consts = dict(consts, CHANNELS_LAST=False)
        r = S.analyse(fn, ptrs, consts, warps, stages, **meta)
        ttgir = S.compile_kernel(fn, ptrs, consts, warps, stages).asm["ttgir"]
        # a loaded tile (activations, mask bytes) converted to another layout; not the
        # [1, BLOCK_S] position rows, which 3.8 relabels at BLOCK_C = 1
        loaded = re.compile(rf"tensor<{consts['BLOCK_C']}x{consts['BLOCK_S']}x(bf16|f16|f32|i8),")
        rows.append(dict(row=f"{r.variant} {r.dtype} {r.config}", error=r.error,
                         registers=r.registers, hot_spills=r.hot_spills,
                         spills=[r.spill_stores, r.spill_loads],
                         tile_converts=sum(bool(loaded.search(line)) for line in
                                           ttgir.splitlines() if "ttg.convert_layout" in line)))
print(json.dumps(rows))
"""


def test_nchw_mask_reduction_keeps_one_layout_without_spills():
    """Every tile of the NCHW mask reduction: no spill in the loop, and no loaded
    [BLOCK_C, BLOCK_S] tile converted between layouts (all its loads agree). Fails on the 2-D byte
    load under triton 3.6 (bf16 8x256: 255 registers, 61 spill instructions in the loop,
    3 tile conversions); triton 3.8 laid that load out like the data."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _NCHW_MASK_REDUCE,
                           os.path.join(ROOT, "scripts")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 12, rows  # add and dual, 3 NCHW tiles, 2 dtypes
    bad = [r for r in rows if r["error"] or r["registers"] <= 0 or r["hot_spills"]
           or r["tile_converts"]]
    assert not bad, bad

# Issue 21's static bar for the forward conv (scripts/static_triton.py HOPPER_BAR, every
# autotuned config, bf16, ResNet-50 specialisations). The variants below miss it today:
# each is a strict xfail naming the figures (benchmarks/static/triton.md, column gaps);
# when a variant starts to pass, the XPASS fails the run and its entry must go.
FORWARD_VARIANTS = [
    "fwd 3x3 s1 (TMA boxes)", "fwd 1x1 s1 (TMA GEMM)",
    "fwd 3x3/1x1 s2 (TMA boxes of the stride-2 view)",
    "fwd 3x3 s1 (TMA boxes) +stats", "fwd 3x3 s1 (TMA boxes) bn-relu prologue +stats",
    "fwd 1x1 s1 (TMA GEMM) bn-relu prologue +stats",
    "fwd 3x3/1x1 s2 (TMA boxes of the stride-2 view) bn-relu prologue +stats",
    "fwd eval 1x1 s1 bias+residual+relu"]
KNOWN_GAPS: dict = {}  # every forward variant meets the bar (benchmarks/static/triton.md)


def test_forward_channels_are_resnet50s():
    """The static check judges each forward variant on the configs the launcher can pick
    at the ResNet-50 convs it runs (``FWD_C_OUT``, pruned by output channels): the
    channel sets are torchvision's resnet50, read from the model, so a wrong or missing
    set (which would leave a config out of the bar) fails here."""
    tv = pytest.importorskip("torchvision")
    S = _script_module()
    want = {}

    def add(variant, conv):
        want.setdefault(variant, set()).add(conv.out_channels)

    s1, s2 = "fwd 3x3 s1 (TMA boxes)", "fwd 3x3/1x1 s2 (TMA boxes of the stride-2 view)"
    gemm, pro = "fwd 1x1 s1 (TMA GEMM)", " bn-relu prologue +stats"
    for block in tv.models.resnet50().modules():
        if not isinstance(block, tv.models.resnet.Bottleneck):
            continue
        strided = block.conv2.stride[0] > 1
        add(gemm, block.conv1)  # its input is the previous block's output: no prologue
        for v in ((s2, s2 + pro) if strided else (s1, s1 + " +stats", s1 + pro)):
            add(v, block.conv2)  # bn1-relu before it
        for v in (gemm, gemm + pro, "fwd eval 1x1 s1 bias+residual+relu"):
            add(v, block.conv3)  # bn2-relu before it, the residual after it
        if block.downsample is not None:
            add(s2 if block.downsample[0].stride[0] > 1 else gemm, block.downsample[0])
    assert {k: set(v) for k, v in S.FWD_C_OUT.items()} == want


_LAUNCHES: dict = {}


def _resnet50_launches(mode):
    """``conv_dgrad``'s and ``conv_wgrad``'s launches (kernels/conv.py) in a training step
    of torchvision's resnet50 converted with backend="triton", ``fusedres.conv.dbn_backward``
    = ``mode``: (kernel, its conv: x's and w's shapes, stride, padding; dbn: the dBN
    prologue's y given; dgrad relu: the dReLU epilogue's y_prev given; wgrad relu: the
    BN-ReLU prologue's scale given). fusedres's own routing (the conv backward op's body,
    ``_conv_backward``) runs on fake tensors (nothing computed); the two kernels and the
    materialising pass, which need real ones, are stand-ins that record the call. Cached
    per mode (1.5 s each)."""
    if mode in _LAUNCHES:
        return _LAUNCHES[mode]
    tv = pytest.importorskip("torchvision")
    pytest.importorskip("triton")
    import inspect

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    import fusedres
    import fusedres.conv as fconv
    from fusedres.kernels import conv as kconv

    launches = []

    class Kernels:  # conv_dgrad / conv_wgrad by keyword as ``_conv_backward`` calls them
        def conv_dgrad(self, dy, weight, input_hw, stride, padding, *, y=None, y_prev=None,
                       **_):
            launches.append(("dgrad", dict(x=(dy.shape[0], weight.shape[1], *input_hw),
                                           w=tuple(weight.shape), stride=tuple(stride),
                                           padding=tuple(padding), dbn=y is not None,
                                           relu=y_prev is not None)))
            return dy.new_empty((dy.shape[0], weight.shape[1], *input_hw)), None, None

        def conv_wgrad(self, dy, x, w_shape, stride, padding, *, y=None, scale=None, **_):
            launches.append(("wgrad", dict(x=tuple(x.shape), w=tuple(w_shape),
                                           stride=tuple(stride), padding=tuple(padding),
                                           dbn=y is not None, relu=scale is not None)))
            return x.new_empty(w_shape)

    for name, keys in (("conv_dgrad", {"y", "y_prev"}), ("conv_wgrad", {"y", "scale"})):
        assert keys <= set(inspect.signature(getattr(kconv, name)).parameters), name
    op = torch.ops.fusedres.triton_conv_backward
    body = fconv.triton_conv_backward._init_fn  # the op's Python body: its mode routing

    class Recorder:  # the op: its body run for the launches, the fake result returned
        def __call__(self, *args):
            body(*args)
            return op(*args)

        def __getattr__(self, name):  # ``.default`` etc. for the redispatch
            return getattr(op, name)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fconv, "dbn_backward", mode)
        mp.setattr(fconv, "kernels", Kernels)
        mp.setattr(fconv, "_materialise_dy", lambda dy, *_: dy)
        mp.setattr(torch.ops.fusedres, "triton_conv_backward", Recorder())
        with FakeTensorMode():
            model = fusedres.convert(tv.models.resnet50(weights=None), inplace=True,
                                     backend="triton")
            model(torch.randn(2, 3, 224, 224)).sum().backward()
    _LAUNCHES[mode] = launches
    return launches


def _channels_run(kernel, variant_of, pair):
    """{variant: the set of ``pair(conv)`` over the convs that launch it} for ``kernel``'s
    launches in a converted ResNet-50, in both dbn_backward modes (conv1-3 of 16 blocks
    each: the downsample conv and the stem run F.conv2d)."""
    want = {}
    for mode in ("fused", "materialised"):
        mine = [c for k, c in _resnet50_launches(mode) if k == kernel]
        assert len(mine) == 48, (mode, len(mine))
        assert any(c["dbn"] for c in mine) == (mode == "fused"), mode
        for c in mine:
            want.setdefault(variant_of(c), set()).add(pair(c["w"]))
    return want


def _dgrad_variant(c):
    """The static check's name of the dgrad variant ``conv_dgrad`` (kernels/conv.py)
    launches for conv ``c`` in bf16 on sm_90 with dense dy: dy by boxes (stride 1; 1x1
    convs apart, R = S = 1 pinned by the JIT), by boxes of a phase (stride 2), and its
    dBN prologue / dReLU epilogue."""
    if c["stride"] != (1, 1):
        kind = "dgrad s2 (TMA boxes of a phase)"
    elif c["w"][2:] == (1, 1):
        kind = "dgrad 1x1 s1 (TMA boxes)"
    else:
        kind = "dgrad 3x3 s1 (TMA boxes)"
    return kind + {(True, True): " dBN prologue + dReLU epilogue",
                   (True, False): " dBN prologue", (False, True): " dReLU epilogue",
                   (False, False): ""}[c["dbn"], c["relu"]]


def test_dgrad_channels_are_resnet50s():
    """The static check judges each dgrad variant ResNet-50 training runs on the configs
    the launcher can pick at the convs that run it (``DGRAD_CHANNELS``: (C_in, C_out),
    pruned by C_in, the GEMM N, and by C_out, the reduction channels: the wide-K tile
    needs C_out % 128 == 0, the dBN coefficients are loaded once at 64). Read from
    fusedres itself (``_resnet50_launches``, dbn_backward "fused" and "materialised"):
    conv1 runs the dBN prologue alone (fused) or the plain 1x1 kernel (materialised),
    conv2 and conv3 the dReLU epilogue alone. A variant or a conv fusedres routes
    differently that the script lacks fails here."""
    S = _script_module()
    want = _channels_run("dgrad", _dgrad_variant, lambda w: (w[1], w[0]))
    assert {k: set(v) for k, v in S.DGRAD_CHANNELS.items()} == want
    assert not set(S.DGRAD_CHANNELS) & set(S.DGRAD_OTHER_CHANNELS)


def _wgrad_variant(c):
    """The static check's name of the wgrad variant ``conv_wgrad`` (kernels/conv.py)
    launches for conv ``c`` in bf16 on sm_90: its pixel walk (a 1x1 stride-1 unpadded
    conv as one row of pixels, stride 1 as boxes, stride 2 with even H and W as boxes of
    the stride-2 view, else pointers; C_in not a multiple of 64: the stem's flat N tiles)
    and its prologues."""
    (_, ci, h, w), (_, _, r, s) = c["x"], c["w"]
    if ci % 64:
        return "wgrad stem C=3 (flat N)"
    if (r, s, *c["stride"], *c["padding"]) == (1, 1, 1, 1, 0, 0):
        kind = "wgrad 1x1 s1 (TMA, one row of pixels)"
    elif c["stride"] == (1, 1):
        kind = "wgrad 3x3 s1 (TMA boxes)"
    elif c["stride"] == (2, 2) and h % 2 == 0 and w % 2 == 0:
        kind = "wgrad 3x3/1x1 s2 (TMA boxes of the stride-2 view)"
    else:
        kind = "wgrad pointers (odd H/W, sm_80)"
    return kind + {(True, True): " dBN + bn-relu prologues", (True, False): " dBN prologue",
                   (False, True): " bn-relu prologue", (False, False): ""}[c["dbn"],
                                                                            c["relu"]]


def test_wgrad_channels_are_resnet50s():
    """The static check judges each wgrad variant ResNet-50 training runs on the configs
    the launcher can pick at the convs that run it (``WGRAD_CHANNELS``: (C_out, C_in),
    pruned by both). Read from fusedres itself (``_resnet50_launches``, dbn_backward
    "fused" and "materialised"): conv1 runs the dBN prologue (fused) or the plain 1x1
    kernel (materialised), conv2 and conv3 the BN-ReLU prologue alone in either mode. A
    variant or a conv fusedres routes differently that the script lacks fails here."""
    S = _script_module()
    want = _channels_run("wgrad", _wgrad_variant, lambda w: tuple(w[:2]))
    assert {k: set(v) for k, v in S.WGRAD_CHANNELS.items()} == want


def test_backward_variants_hold_resnet50s():
    """Every dgrad / wgrad variant a converted ResNet-50 runs (the two dicts the tests
    above check) is held to issue 21's backward bar (``BACKWARD_VARIANTS``)."""
    S = _script_module()
    assert set(S.DGRAD_CHANNELS) | set(S.WGRAD_CHANNELS) <= set(BACKWARD_VARIANTS)
    # and every TMA dgrad variant the wide-K tile is offered to has its test
    assert set(WIDE_K_VARIANTS) == {
        v for v, shapes in S.DGRAD_SHAPES.items() if ("dBN" in v or "dReLU" in v)
        and "pointers" not in v and any(co % 128 == 0 for _, co in shapes)}


def _compile_rows(tmp_path_factory, match):
    """(the script module, the bf16 conv rows matching ``match``, the script's log)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    out = tmp_path_factory.mktemp("static_rows")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, SCRIPT, "--only", "conv", "--dtype", "bf16",
                           "--match", match, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=1200)
    report = json.loads((out / "triton.json").read_text())
    return _script_module(), report["results"], proc.stdout[-3000:] + proc.stderr[-2000:]


def _variants(names, known_gaps):
    """Test parameters: the variants that miss the bar are strict xfails naming why."""
    return [pytest.param(v, marks=pytest.mark.xfail(strict=True, reason=known_gaps[v]))
            if v in known_gaps else v for v in names]


def _one_of(config, configs):
    """Whether a row's ``config`` is one of ``configs`` (a substring, or a tuple of them)."""
    return any(c in config for c in ((configs,) if isinstance(configs, str) else configs))


def _check_bar(rows, variant, applies, gaps_of, config=""):
    S, results, log = rows
    mine = [S.Result(**r) for r in results if r["variant"] == variant
            and _one_of(r["config"], config)]
    assert mine and all(applies(S)(r) for r in mine), log
    gaps = {r.config: gaps_of(S)(r) for r in mine}
    assert not any(gaps.values()), gaps


@pytest.fixture(scope="module")
def forward_rows(tmp_path_factory):
    return _compile_rows(tmp_path_factory, r"conv \[fwd")


@pytest.mark.slow
@pytest.mark.parametrize("variant", _variants(FORWARD_VARIANTS, KNOWN_GAPS))
def test_forward_meets_the_hopper_bar(forward_rows, variant):
    found = {r["variant"] for r in forward_rows[1] if r["variant"].startswith("fwd")}
    assert {v for v in found if "stem" not in v and "pointers" not in v} \
        == set(FORWARD_VARIANTS), forward_rows[2]
    _check_bar(forward_rows, variant, lambda S: S.forward_row, lambda S: S.hopper_gaps)


# dgrad and wgrad (issue 21: TMA, <= 48 SASS per HGMMA, no division in the loop)
BACKWARD_VARIANTS = ["dgrad 1x1 s1 (TMA boxes)", "dgrad 1x1 s1 (TMA boxes) dBN prologue",
                     "dgrad 3x3 s1 (TMA boxes) dReLU epilogue",
                     "dgrad 1x1 s1 (TMA boxes) dReLU epilogue",
                     "dgrad s2 (TMA boxes of a phase) dReLU epilogue",
                     "dgrad 3x3 s1 (TMA boxes)",
                     "dgrad 3x3 s1 (TMA boxes) dBN prologue + dReLU epilogue",
                     "dgrad s2 (TMA boxes of a phase)",
                     "dgrad s2 (TMA boxes of a phase) dBN prologue + dReLU epilogue",
                     "wgrad 3x3 s1 (TMA boxes)", "wgrad 1x1 s1 (TMA, one row of pixels)",
                     "wgrad 3x3/1x1 s2 (TMA boxes of the stride-2 view)",
                     "wgrad 1x1 s1 (TMA, one row of pixels) dBN prologue",
                     "wgrad 3x3 s1 (TMA boxes) bn-relu prologue",
                     "wgrad 1x1 s1 (TMA, one row of pixels) bn-relu prologue",
                     "wgrad 3x3/1x1 s2 (TMA boxes of the stride-2 view) bn-relu prologue",
                     "wgrad 3x3 s1 (TMA boxes) dBN + bn-relu prologues"]
# (variant, the configs it covers: a substring of the row's config ("" all) or a tuple of
# them, why): each config a strict xfail; the variant's other configs are held to the bar
BACKWARD_GAPS = {
    # wgrad's dBN prologue with the BN-ReLU one (bn_relu_conv2d_stats only): dy' is B, in
    # fp32 (eager's one rounding: kernels/conv.py, the DBN comment), stored to shared
    # memory and fenced every K step, over 4 HGMMA per warp; x' is A in registers
    "wgrad 3x3 s1 (TMA boxes) dBN + bn-relu prologues": (
        "BLOCK_N=128,",
        "at C_in = 128: 79.5 SASS per HGMMA > 48 (3.6: 79.2; 91.0 before pixel_box's exact "
        "boxes dropped the mask of dy', 99.0 before dy' was computed by pairs, 123.2 before "
        "x' went to A): x' is wgmma's A in registers (packed bf16), but dy' = dy + "
        "y*coef_y + coef_c stays B, in fp32 (4.5 SASS per element), stored to shared "
        "memory and fenced every K step, over 4 HGMMA per warp (40 SASS per HGMMA for "
        "dy', 12 for x'); 8 per warp, as the 128x256 tile at C_in >= 256 (47.4, held to "
        "the bar), would need two taps per N tile at C_in = 128: tried, 51.4 (two boxes "
        "of x and two MMAs a K step, each fencing dy' and committing its own group; 255 "
        "registers) (run by bn_relu_conv2d_stats, not by a converted ResNet-50: "
        "WGRAD_CHANNELS)"),
}
# Rows that miss the bar under triton 3.6 only (the GPU machine's; 3.8 meets it, held to
# it above): excused in the 3.6 table's check, which fails when one starts to meet it.
# (variant, config substring, why)
BACKWARD_GAPS_36 = {
    "wgrad 1x1 s1 (TMA, one row of pixels) dBN prologue": (
        "BLOCK_M=64, BLOCK_N=64, BLOCK_K=256",
        "layer1's first conv1 (C_in = C_out = 64): 51.8 SASS per HGMMA > 48 (3.8: 47.8). "
        "dy' in fp32 costs 4.5 SASS per element (two unpacks, FFMA, FADD, half a pack: "
        "_dbn_pairs_bf16) and a thread computes 8 elements per HGMMA at any tile of 64 "
        "channels; 3.6 adds a WARPGROUP.ARRIVE and descriptor math to each register-A "
        "HGMMA (32 + ~50 SASS per K step). As B (swapped) 49.9 under 3.6. The layer is "
        "memory-bound (384 bytes and 8192 FLOP a pixel), so this issue rate does not "
        "limit it: ~92 us of HBM traffic at batch 256 on an H100 against ~11 us of "
        "issue"),
}


@pytest.fixture(scope="module")
def backward_rows(tmp_path_factory):
    return _compile_rows(tmp_path_factory, r"conv \[dgrad|conv_wgrad \[wgrad")


# dgrad's wide-K tiles (kernels/conv.py ``_wide_k``: BLOCK_K 128; fused, i.e. the dBN
# prologue or the dReLU epilogue, dy by TMA boxes, C_out % 128 == 0): offered by every
# fused TMA variant, ResNet-50's (conv1's dBN prologue at C_out 128-512; the dReLU
# epilogue of conv2 at 128-512 and conv3 at 256-2048) and bn_relu_conv2d_stats's; they
# must meet the bar wherever the installed Triton autotunes them: 128x128 at 8 warps
# (3.8: 38.6 SASS per HGMMA with the dBN prologue alone, 15.8-17.0 with the dReLU
# epilogue alone, 39.9 / 40.4 with both at stride 1 / 2; 3.6: 42.6, 19.5-20.6, 43.2 /
# 43.4), 128x64 at 4 warps (3.6: 38.5, 10.3-11.0, 39.1 / 39.2; left out from 3.7,
# ``_BELOW_TRITON``: 3.8 spills inside its K loop).
WIDE_K_VARIANTS = ("dgrad 1x1 s1 (TMA boxes) dBN prologue",
                   "dgrad 3x3 s1 (TMA boxes) dReLU epilogue",
                   "dgrad 1x1 s1 (TMA boxes) dReLU epilogue",
                   "dgrad s2 (TMA boxes of a phase) dReLU epilogue",
                   "dgrad 3x3 s1 (TMA boxes) dBN prologue + dReLU epilogue",
                   "dgrad s2 (TMA boxes of a phase) dBN prologue + dReLU epilogue")
WIDE_K_CONFIG = "BLOCK_K=128"


def known_backward_gap(r):
    """Whether a bf16 dgrad / wgrad row is a known gap (``BACKWARD_GAPS``: its variant, and
    the configs the gap covers)."""
    return r.variant in BACKWARD_GAPS and _one_of(r.config, BACKWARD_GAPS[r.variant][0])


def _held_rows(rows):
    """``rows`` without the known gaps' rows."""
    S, results, log = rows
    return S, [r for r in results if not known_backward_gap(S.Result(**r))], log


@pytest.mark.slow
@pytest.mark.parametrize("variant", [v for v in BACKWARD_VARIANTS
                                     if BACKWARD_GAPS.get(v, ("x",))[0]])
def test_backward_meets_the_hopper_bar(backward_rows, variant):
    """Every bf16 row of the variant but a known gap's meets issue 21's backward bar."""
    S, results, log = backward_rows
    assert any(r["variant"] == variant for r in results), log
    held = _held_rows(backward_rows)
    if not any(r["variant"] == variant for r in held[1]):
        pytest.skip(f"every config of it under triton {S.triton.__version__} is a known gap "
                    "(the stride-2 dBN's wide-K tile: triton < 3.7 only)")
    _check_bar(held, variant, lambda S: S.backward_row, lambda S: S.backward_gaps)


@pytest.mark.slow
@pytest.mark.parametrize("variant,config", [pytest.param(v, c, marks=pytest.mark.xfail(
    strict=True, reason=why)) for v, (cs, why) in BACKWARD_GAPS.items()
    for c in ((cs,) if isinstance(cs, str) else cs)])
def test_backward_known_gaps(backward_rows, variant, config):
    """The known gaps' rows, strict xfails, each config apart: when one starts to meet the
    bar, the XPASS fails the run and its config must leave the entry."""
    _check_bar(backward_rows, variant, lambda S: S.backward_row, lambda S: S.backward_gaps,
               config=config)


@pytest.mark.slow
@pytest.mark.parametrize("variant", WIDE_K_VARIANTS)
def test_dgrad_wide_k_tile_meets_the_hopper_bar(backward_rows, variant):
    """The wide-K tiles' rows (every C_out % 128 == 0 of ``DGRAD_SHAPES``: 128 ... 2048)
    meet issue 21's backward bar where the installed Triton autotunes them (128x128 at 8
    warps under any; 128x64 at 4 warps below 3.7)."""
    from fusedres.kernels import conv as kconv

    wide = [t for t in kconv._CONV_TILES["fused"] if t[2] == kconv._WIDE_K]
    assert (128, 128, 128, 8, 2) in wide and (128, 64, 128, 4, 3) in wide
    if not any(kconv._triton_ok("fused", t) for t in wide):
        pytest.skip(f"triton {kconv.TRITON_VERSION} leaves the wide-K tiles out")
    _check_bar(backward_rows, variant, lambda S: S.backward_row,
               lambda S: S.backward_gaps, config=WIDE_K_CONFIG)


@pytest.mark.slow
def test_dgrad_dbn_epilogue_does_not_spill(backward_rows):
    """The dgrad rows with the dBN prologue or the dReLU epilogue (every config, bf16) use
    no local memory at all: the strided 128x128 tile's dReLU epilogue parked 28 B there
    (255 registers) while it held y_prev's tile in fp32 (kernels/conv.py keeps it
    16-bit)."""
    S, results, log = backward_rows
    rows = [r for r in results if r["variant"].startswith("dgrad")
            and ("dBN" in r["variant"] or "dReLU" in r["variant"])
            and r["variant"] != POINTER_DBN]
    # dBN alone (1x1), dReLU alone (1x1, 3x3, s2 boxes, s2 pointers), both (3x3, s2 boxes,
    # s2 pointers)
    assert len({r["variant"] for r in rows}) == 8, log
    assert all((r["spill_stores"], r["spill_loads"]) == (0, 0) for r in rows), \
        [(r["variant"], r["config"], r["registers"], r["spill_stores"]) for r in rows]


POINTER_DBN = "dgrad 1x1 s1 (dy by pointers: sparse dy) dBN prologue"


@pytest.mark.slow
def test_dgrad_dbn_by_pointers_spills_nothing_in_its_loop(backward_rows):
    """conv1's dBN prologue with dy by pointers (sm_90 where TMA cannot read dy or y;
    outside the bar), every config ``conv_configs`` offers there (``_dbn_tiles``): no
    spill in the K loop. The 4-warp 128x128x64 tile, offered there (first) from the d256
    merge to 2026-12-07, spilled 436 B, and 500 B with 2 spill instructions in the loop
    with the coefficients once (C_out 64; 255 registers; triton 3.6: 404 B outside it);
    now the 8-warp one (no spill). 128x64 at 4 warps (C_out 64) parks 0-32 B outside the
    loop (3.6: 8-20 B; offered there before too, as in the "fused" list)."""
    S, results, log = backward_rows
    rows = [r for r in results if r["variant"] == POINTER_DBN]
    assert rows, log
    assert all(r["hot_spills"] == 0 and not r["error"] for r in rows), \
        [(r["config"], r["registers"], r["spill_stores"], r["hot_spills"]) for r in rows]


# The GPU machine runs triton 3.6 (torch 2.11), CI and setup.sh 3.8: CI cannot compile
# with 3.6 (a second stack, ~4.7 GB from PyPI, and ~8 min of compiling on 2 cores, over
# its budget), so the 3.6 table is committed (scripts/triton36_check.sh makes it) with the
# digests of the kernel sources it was compiled from, and checked here against them.
TRITON36 = os.path.join(ROOT, "benchmarks", "static", "triton-3.6", "triton.json")
TRITON36_RERUN = ("bash scripts/triton36_check.sh [VENV] (it makes VENV with torch 2.11 and "
                  "triton 3.6 where missing; its static half alone: python "
                  "scripts/static_triton.py --python VENV/bin/python --out "
                  "benchmarks/static/triton-3.6), then commit benchmarks/static/triton-3.6/")


def _tile(config):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of a row's config string."""
    return tuple(int(re.search(rf"\b{k}=(\d+)", config).group(1))
                 for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "warps", "stages"))


def _missing_backward_rows(report, S, version):
    """The dgrad configs the launcher autotunes under triton ``version`` at the ResNet-50
    channels (``DGRAD_SHAPES``: those of the convs that run each variant, and of the 3x3
    convs for the functions' and sm_80's), and the wgrad ones (``WGRAD_CHANNELS``), that have no
    bf16 row in ``report``."""
    kc = S._load("conv")
    kc.INTERPRET = False  # the GPU's lists (the CPU tests run with TRITON_INTERPRET=1)
    have = {(r["variant"], _tile(r["config"])) for r in report["results"]
            if r["dtype"] == "bf16" and r["variant"].startswith("dgrad")}
    out = []
    for variant, shapes in S.DGRAD_SHAPES.items():
        fused = "dBN" in variant or "dReLU" in variant
        for cfg in S._configs_at(kc, shapes, transposed=True, fused=fused, itemsize=2,
                                 strided=" s2 " in variant, a_tma="pointers" not in variant,
                                 triton_version=version, dbn="dBN" in variant,
                                 drelu="dReLU" in variant):
            tile = tuple(cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + (
                cfg.num_warps, cfg.num_stages)
            if (variant, tile) not in have:
                out.append(f"no bf16 row of {variant} at {tile}")
    # and wgrad's at the channels of the ResNet-50 convs that run each variant
    have = {(r["variant"], _tile(r["config"])) for r in report["results"]
            if r["dtype"] == "bf16" and r["kernel"] == "conv_wgrad"}
    for variant, shapes in S.WGRAD_CHANNELS.items():
        fused, dbn, bn_relu = "prologue" in variant, "dBN" in variant, "bn-relu" in variant
        for cfg in S._union_of(lambda c: kc.wgrad_configs(fused=fused, gemm_m=c[0],
                                                          channels=c[1], dbn=dbn,
                                                          bn_relu=bn_relu), shapes):
            tile = tuple(cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + (
                cfg.num_warps, cfg.num_stages)
            if (variant, tile) not in have:
                out.append(f"no bf16 row of {variant} at {tile}")
    return out


def triton36_findings(report, S):
    """What is wrong with a Triton 3.6 table (``report``: its triton.json): compiled by
    another Triton, from kernel sources other than the current ones, a bar variant
    missing (or a dgrad or wgrad config the launcher autotunes under 3.6 at the ResNet-50
    channels), a problem (spill, compile error), or a bf16 row of a bar variant
    (``FORWARD_VARIANTS``, ``BACKWARD_VARIANTS``) that misses it (the known gaps of
    ``BACKWARD_GAPS`` excepted, by variant and config: they miss it under 3.8 too,
    strict xfails above, ``known_backward_gap``)."""
    out = []
    if not report.get("triton", "").startswith("3.6."):
        out.append(f"compiled by triton {report.get('triton')}, not 3.6")
    results = [S.Result(**r) for r in report["results"]]
    recorded = report.get("sources") or {}
    for path in sorted({S.row_source(r.kernel) for r in results}):
        if recorded.get(path) != S.source_digest(path):
            out.append(f"{path} changed since the table was made (digest "
                       f"{str(recorded.get(path))[:12]}, now {S.source_digest(path)[:12]})")
    bf16 = {r.variant for r in results if r.dtype == "bf16"}
    for v in FORWARD_VARIANTS + BACKWARD_VARIANTS:
        if v not in bf16:
            out.append(f"no bf16 row of {v}")
    out += _missing_backward_rows(report, S, (3, 6))
    out += [f"problem: {p}" for p in S.problems(results)]
    for r in results:
        gaps = (S.hopper_gaps(r) if S.forward_row(r) and r.variant in FORWARD_VARIANTS else
                S.backward_gaps(r) if S.backward_row(r) and r.variant in BACKWARD_VARIANTS
                and not known_backward_gap(r) else [])
        gap_36 = BACKWARD_GAPS_36.get(r.variant)
        if gap_36 and r.dtype == "bf16" and _one_of(r.config, gap_36[0]):
            if not gaps:
                out.append(f"{r.kernel} [{r.variant}] {r.config} meets the bar under 3.6 "
                           "now: its BACKWARD_GAPS_36 entry must go")
            continue
        if gaps:
            out.append(f"{r.kernel} [{r.variant}] {r.config}: {'; '.join(gaps)}")
    return out


def test_triton36_table_is_current_and_meets_the_bar():
    """The committed Triton 3.6 table (the GPU machine's compiler) was made from the
    current kernel sources and every bf16 row issue 21's bar applies to meets it there
    (the forward rows; dgrad / wgrad but the known dBN gaps). A kernel change makes it
    fail until the 3.6 check is rerun."""
    pytest.importorskip("triton")
    S = _script_module()
    with open(TRITON36) as f:
        report = json.load(f)
    found = triton36_findings(report, S)
    assert not found, "\n".join(found) + "\nRerun the Triton 3.6 check: " + TRITON36_RERUN


TRITON38 = os.path.join(ROOT, "benchmarks", "static", "triton.json")


def test_triton38_table_is_current():
    """The committed table of CI's Triton (benchmarks/static/triton.md, which the docs
    quote) was made from the current kernel sources: every source its rows came from is
    recorded with its digest. The bar itself is enforced on fresh compiles by the tests
    above; this keeps the committed figures from going stale at a merge."""
    pytest.importorskip("triton")
    S = _script_module()
    with open(TRITON38) as f:
        report = json.load(f)
    recorded = report.get("sources") or {}
    stale = [f"{path}: digest {str(recorded.get(path))[:12]}, now "
             f"{S.source_digest(path)[:12]}"
             for path in sorted({S.row_source(r["kernel"]) for r in report["results"]})
             if recorded.get(path) != S.source_digest(path)]
    assert not stale, ("benchmarks/static/triton.json is older than the kernel sources ("
                       + "; ".join(stale) + "): rerun .venv/bin/python "
                       "scripts/static_triton.py and commit benchmarks/static/")


def _dbn_s1_rows(table):
    """The bf16 rows of conv1's dgrad (dBN prologue) with the 128x64x64 tile (C_in 64; with
    and without the coefficients loaded once) in a triton.json."""
    return [r for r in table["results"] if r["dtype"] == "bf16"
            and r["variant"] == "dgrad 1x1 s1 (TMA boxes) dBN prologue"
            and "BLOCK_N=64, BLOCK_K=64" in r["config"]]


def test_triton36_check_can_fail():
    """The check above on altered copies of the table: a changed kernel source (its
    recorded digest no longer matches), a forward row over the bar, a missing variant,
    another Triton -- each is found; the table as committed is not (the test above)."""
    pytest.importorskip("triton")
    S = _script_module()
    with open(TRITON36) as f:
        good = json.load(f)
    for alter, want in (
            (lambda t: t["sources"].update({"kernels/conv.py": "0" * 64}),
             "kernels/conv.py changed"),
            (lambda t: next(r for r in t["results"] if r["dtype"] == "bf16" and r["variant"]
                            == "fwd 3x3/1x1 s2 (TMA boxes of the stride-2 view)").update(
                                sass_per_hgmma=32.2), "SASS per HGMMA in the hot loop > 32"),
            (lambda t: t.update(results=[r for r in t["results"] if r["variant"] !=
                                         "fwd 1x1 s1 (TMA GEMM)"]), "no bf16 row of fwd 1x1"),
            (lambda t: t.update(triton="3.8.0"), "not 3.6"),
            # the dgrad wide-K tile's row is held to the bar (not a known gap) ...
            (lambda t: t["results"].append(dict(_dbn_s1_rows(t)[0], sass_per_hgmma=48.5, config=(
                "BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, warps=4, stages=3"))),
             "BLOCK_K=128, GROUP_M=8, warps=4, stages=3: 48.5 SASS per HGMMA"),
            # ... and a dgrad config the launcher autotunes under 3.6 must have a row
            (lambda t: [t["results"].remove(r) for r in _dbn_s1_rows(t)],
             "no bf16 row of dgrad 1x1 s1 (TMA boxes) dBN prologue at (128, 64, 64, 4, 5)"),
            # ... and a wgrad one at the channels of the convs that run it (conv1's 64x64)
            (lambda t: t.update(results=[r for r in t["results"] if not (
                r["variant"] == "wgrad 1x1 s1 (TMA, one row of pixels)"
                and "BLOCK_M=64, BLOCK_N=64," in r["config"])]),
             "no bf16 row of wgrad 1x1 s1 (TMA, one row of pixels) at (64, 64, 64, 4, 4)")):
        bad = json.loads(json.dumps(good))
        alter(bad)
        found = triton36_findings(bad, S)
        assert any(want in f for f in found), (want, found)


def test_older_triton_leaves_out_the_tiles_over_the_bar(monkeypatch):
    """kernels/conv.py ``_MIN_TRITON``: under triton < 3.7 (the GPU machine's 3.6) the
    forward prologue's two-warpgroup 256x128 tile is not autotuned (3.6 compiles it to
    51.9 SASS per HGMMA, bar 48; 3.8 to 47.5), in conv_fwd's list and in the autotuner's
    prune alike; 3.8 keeps it; the 128-row tiles stay under both."""
    import torch

    from fusedres.kernels import conv as kconv

    monkeypatch.setattr(kconv, "INTERPRET", False)

    def tiles(version, **kw):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
                for c in kconv.conv_configs(fused=True, triton_version=version, **kw)}

    for co in (64, 256, 2048):
        old, new = tiles((3, 6), gemm_n=co), tiles((3, 8), gemm_n=co)
        assert (256, 128, 8) not in old and old == new - {(256, 128, 8)}, (co, old, new)
        assert (256, 128, 8) in new and (128, 128, 4) in old, (co, old, new)
    assert tiles((3, 6)) == tiles((3, 7)) - {(256, 128, 8)}
    # the autotuner's prune reads the installed version
    every = kconv._configs(kconv._union(kconv._CONV_TILES))
    nargs = dict(GEMM_N=256, X_ptr=torch.empty(0, dtype=torch.bfloat16), STRIDE_H=1,
                 STRIDE_W=1)
    kw = dict(TAP_LOOP=True, TRANSPOSED=False, PROLOGUE=1, DRELU=False, HAS_RESIDUAL=False)
    for version in ((3, 6), (3, 8)):
        monkeypatch.setattr(kconv, "TRITON_VERSION", version)
        pruned = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
                  for c in kconv._conv_prune(every, nargs, **kw)}
        assert pruned == tiles(version, gemm_n=256), (version, pruned)
