"""CPU shortcuts of the fused path against the plain modules: BatchNorms folded into the
convolutions before them, the pixel attention in place; and where the shortcuts, in
inference and training, step aside for hooks and other module types."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmrest.models import ResT, ResTV2
from mmrest.models.layers import ConvStem, ConvStemV2, PatchEmbed
from mmrest.models.layers.embed import conv_norm

pytestmark = pytest.mark.usefixtures('one_intra_op_thread')


class OpNames(TorchDispatchMode):
    """Records the name of every op that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('norm_type', [nn.BatchNorm2d, nn.SyncBatchNorm])
@pytest.mark.parametrize('bias', [False, True])
@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize('groups, dilation', [(1, 1), (4, 2)])
def test_folded_norm_is_the_same_function(norm_type, bias, dtype, tol, groups, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=bias, groups=groups,
                     dilation=dilation).to(dtype)
    norm = norm_type(8).to(dtype).eval()
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.2, 3)
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 4, 9, 7, dtype=dtype)
    with torch.no_grad():
        ref = norm(conv(x))
        with OpNames() as mode:
            out = conv_norm(conv, norm, x)
    assert not any('batch_norm' in name for name in mode.names)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


class DoubledNorm(nn.BatchNorm2d):

    def forward(self, x):
        return 2 * super().forward(x)


def test_norm_is_not_folded_where_it_would_not_be_the_same_function():
    """Training mode (batch statistics), autograd recording, no running statistics, a
    norm subclass with its own forward, a BatchNorm1d, fold=False, CPU autocast, forward
    hooks (the module's, global ones, ``weight_norm``'s pre-hook; not hooks that only
    observe) and the meta device: the modules themselves."""
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
    x = torch.randn(2, 3, 5, 5)

    def same_as_modules(n, x_=x, fold=True):
        with OpNames() as mode:
            out = conv_norm(conv, n, x_, fold)
        assert any('batch_norm' in name for name in mode.names)
        return out

    with torch.no_grad():
        assert torch.equal(same_as_modules(norm.train()), norm(conv(x)))
        norm.eval()
        assert torch.equal(same_as_modules(norm, fold=False), norm(conv(x)))
        stats_free = nn.BatchNorm2d(4, track_running_stats=False).eval()
        assert torch.equal(same_as_modules(stats_free), stats_free(conv(x)))
        custom = DoubledNorm(4).eval()  # a norm with a forward of its own
        assert torch.equal(same_as_modules(custom), custom(conv(x)))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            same_as_modules(norm)
    out = same_as_modules(norm)  # autograd records
    assert out.grad_fn is not None
    with torch.no_grad():
        # a BatchNorm1d refuses the map, folded or not
        with pytest.raises(ValueError, match='expected 2D or 3D input'):
            conv_norm(conv, nn.BatchNorm1d(4).eval(), x)
        # hooks see what they would see: the modules are called
        seen = []
        hook = norm.register_forward_hook(lambda m, i, o: seen.append(o))
        assert torch.equal(same_as_modules(norm), norm(conv(x))) and len(seen) == 2
        hook.remove()

        def observer(module, inputs, output):
            pass

        observer.observes_only = True  # (as the profiler's ranges): folding goes on
        hook = norm.register_forward_hook(observer)
        with OpNames() as mode:
            conv_norm(conv, norm, x)
        hook.remove()
        assert not any('batch_norm' in name for name in mode.names)
        global_hook = nn.modules.module.register_module_forward_hook(
            lambda m, i, o: None)
        try:
            same_as_modules(norm)
        finally:
            global_hook.remove()
        normed_conv = torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3, padding=1))
        normed_conv.weight_g.mul_(2)  # the weight is made by a pre-hook
        with OpNames() as mode:
            out = conv_norm(normed_conv, norm, x)
        assert any('batch_norm' in name for name in mode.names)
        torch.testing.assert_close(out, norm(normed_conv(x)), rtol=0, atol=0)
    meta_conv, meta_norm = nn.Conv2d(3, 4, 3, device='meta'), nn.BatchNorm2d(4, device='meta')
    with torch.no_grad():
        assert conv_norm(meta_conv, meta_norm.eval(),
                         torch.empty(1, 3, 5, 5, device='meta')).device.type == 'meta'


@pytest.mark.parametrize('module', [ConvStem(3, 16), PatchEmbed(8, 16), ConvStemV2(3, 16)])
def test_stems_and_patch_embeddings_fold_their_norms_in_inference(module):
    """Folded in inference, the modules' values to rounding; the stems' and
    embeddings' own hooks still run."""
    torch.manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.2, 3)
    module.eval()
    x = torch.randn(2, 8 if isinstance(module, PatchEmbed) else 3, 13, 10)
    with torch.no_grad():
        with OpNames() as mode:
            out = module(x)
        assert not any('batch_norm' in name for name in mode.names)
        # a hook on a norm (or on ResT V2's ``proj``) is run: nothing is folded then
        hooked = module.proj if isinstance(module, ConvStemV2) else (
            module.norm1 if isinstance(module, ConvStem) else module.norm)
        calls = []
        hook = hooked.register_forward_hook(lambda *a: calls.append(1))
        with OpNames() as mode:
            hooked_out = module(x)
        hook.remove()
        assert calls == [1] and any('batch_norm' in name for name in mode.names)
        module.fold_norm = False
        with OpNames() as mode:
            ref = module(x)
        assert any('batch_norm' in name for name in mode.names)
    for a, b, c in zip(*((t if isinstance(t, tuple) else (t, ))
                         for t in (out, ref, hooked_out))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('cls, arch', [(ResT, 'lite'), (ResTV2, 'tiny')])
def test_backbones_fold_their_norms_with_the_fused_impl_only(cls, arch):
    """In CPU inference the fused backbones fold every BatchNorm, the references run
    the modules; values agree to rounding. In float64: float32 rounding, amplified by
    the depth of a randomly initialised backbone, reaches 1e-4 on some CPUs."""
    torch.manual_seed(0)
    fused = cls(arch=arch).eval()
    ref = cls(arch=arch, attn_impl='reference').eval()
    for m in fused.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
    ref.load_state_dict(fused.state_dict())
    fused.double()
    ref.double()
    x = torch.randn(1, 3, 64, 48, dtype=torch.float64)
    with torch.no_grad():
        with OpNames() as mode:
            out = fused(x)
        assert not any('batch_norm' in n for n in mode.names)
        with OpNames() as mode:
            out_ref = ref(x)
        assert any('batch_norm' in n for n in mode.names)
    for a, b in zip(out, out_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert {m.fold_norm for m in fused.modules() if hasattr(m, 'fold_norm')} == {True}
    assert {m.fold_norm for m in ref.modules() if hasattr(m, 'fold_norm')} == {False}


def test_pixel_attention_in_inference_is_the_plain_function_in_place():
    """In place with the fused path's flag; plain for the reference, and where a hook on
    its conv would see the conv's output overwritten."""
    from mmrest.models.layers import PixelAttention
    torch.manual_seed(0)
    pa = PixelAttention(8)
    x = torch.randn(2, 8, 7, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with OpNames() as mode:
            out = pa(x)
        ref = x * pa.pa_conv(x).sigmoid()
        assert torch.equal(out, ref)
        assert 'aten.sigmoid_' in mode.names and 'aten.mul_' in mode.names
        assert out.is_contiguous(memory_format=torch.channels_last)
        seen = []
        hook = pa.pa_conv.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
        with OpNames() as mode:
            assert torch.equal(pa(x), ref)
        hook.remove()
        assert 'aten.sigmoid_' not in mode.names
        assert torch.equal(seen[0], pa.pa_conv(x))
        pa.recompute_gate = False  # as the reference backbones set it
        with OpNames() as mode:
            assert torch.equal(pa(x), ref)
        assert 'aten.sigmoid_' not in mode.names


class KeepOutput:
    """A forward hook that keeps each output and a copy of it taken when the module
    returned: an in-place write into the output after that would make them differ."""

    def __init__(self) -> None:
        self.kept = []

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> None:
        self.kept.append((output, output.clone()))

    def unchanged(self) -> bool:
        return bool(self.kept) and all(torch.equal(o, c) for o, c in self.kept)


def block_by_hand(block, x: torch.Tensor, hw) -> torch.Tensor:
    """The block's function from its modules, with no CPU shortcut around them."""
    x = x + block.attn(block.norm1(x), hw)
    mlp = block.mlp
    return x + mlp.fc2(nn.functional.gelu(mlp.fc1(block.norm2(x))))


@pytest.mark.parametrize('cls, arch', [(ResT, 'lite'), (ResTV2, 'tiny')])
@pytest.mark.parametrize('hooked', ['attn', 'mlp', 'mlp.fc1', 'mlp.act', 'mlp.fc2',
                                    'attn.proj'])
def test_forward_hooks_see_what_their_modules_return(cls, arch, hooked):
    """CPU inference writes the GELU over fc1's output, adds the residual into the
    branch's output and runs LayerNorm + MLP in blocks without calling the modules: not
    where a forward hook on one of them would miss its call or see its output change."""
    torch.manual_seed(0)
    model = cls(arch, out_indices=(0, 1), drop_path_rate=0.).eval()
    block = model.stage2[0]
    x = torch.randn(1, 77, model.embed_dims[1])
    with torch.no_grad():
        expected = block_by_hand(block, x, (7, 11))
        hook = KeepOutput()
        handle = block.get_submodule(hooked).register_forward_hook(hook)
        out = block(x, (7, 11))
        handle.remove()
        assert hook.unchanged(), f'{hooked}: not called, or its output was overwritten'
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        # without hooks the shortcuts are taken again, with the same result
        torch.testing.assert_close(block(x, (7, 11)), expected, rtol=1e-5, atol=1e-5)


def test_forward_hook_on_the_v2_upsampling_norm_sees_its_output():
    """ResT V2 adds the attention into the up-sampling's fresh output in CPU inference:
    not where a hook on ``up_norm`` keeps that output."""
    torch.manual_seed(0)
    attn = ResTV2('tiny').eval().stage1[0].attn
    x = torch.randn(2, 8 * 12, attn.embed_dims)
    with torch.no_grad():
        plain = attn(x, (8, 12))
        hook = KeepOutput()
        attn.up_norm.register_forward_hook(hook)
        assert torch.equal(attn(x, (8, 12)), plain)
    assert hook.unchanged()


@pytest.mark.parametrize('cls, arch', [(ResT, 'lite'), (ResTV2, 'tiny')])
def test_dynamically_quantized_blocks_run_their_modules(cls, arch):
    """After ``quantize_dynamic`` (a common CPU deployment step) the linear layers are
    quantized modules: the blocked LayerNorm + MLP, which reads float weights, is not
    taken, and each block is its modules' function."""
    torch.manual_seed(0)
    model = cls(arch, out_indices=(0, 1, 2, 3), drop_path_rate=0.).eval()
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    block = quantized.stage1[0]
    assert type(block.mlp.fc1) is not nn.Linear
    x = torch.randn(2, 9 * 13, model.embed_dims[0])
    with torch.no_grad():
        torch.testing.assert_close(block(x, (9, 13)), block_by_hand(block, x, (9, 13)),
                                   rtol=1e-5, atol=1e-5)
        outs = quantized(torch.randn(1, 3, 61, 83))
    assert [tuple(o.shape) for o in outs] == [
        (1, c, -(-61 // s), -(-83 // s)) for c, s in zip(model.embed_dims, (4, 8, 16, 32))]


# --- shortcuts that use a module's weights in place of calling it, in training too ------

def _doubles(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """A forward hook that changes the output: a shortcut that skips it is seen."""
    _doubles.calls += 1
    return output * 2


@pytest.mark.parametrize('cls, arch, path', [
    (ResT, 'lite', 'attn.transform_conv'),
    (ResTV2, 'tiny', 'attn.up'), (ResTV2, 'tiny', 'attn.up.0'), (ResTV2, 'tiny', 'attn.up.1'),
])
@pytest.mark.parametrize('training', [False, True])
def test_fused_attention_calls_the_modules_that_have_hooks(cls, arch, path, training):
    """The fused attention reads the head-mixing conv (ResT) and the up-sampling conv
    (ResT V2) as weights; where such a module (or the up-sampling as a whole) has a hook,
    it is called, and the function and its gradients are those of the reference
    implementation, which calls the modules (in float64: equal to rounding)."""
    torch.manual_seed(0)
    block = cls(arch, drop_path_rate=0.).train(training).stage2[0].double()
    x = torch.randn(2, 7 * 11, block.attn.embed_dims, dtype=torch.float64,
                    requires_grad=training)
    handle = block.get_submodule(path).register_forward_hook(_doubles)
    results = []
    for impl in ('fused', 'reference'):
        block.attn.attn_impl = impl
        _doubles.calls = 0
        with torch.set_grad_enabled(training):
            out = block.attn(x, (7, 11))
        assert _doubles.calls == 1, f'{impl}: the hook on {path} ran {_doubles.calls} times'
        grads = torch.autograd.grad(out.square().sum(), [x] + list(
            block.attn.parameters())) if training else ()
        results.append((out.detach(), grads))
    handle.remove()
    (fused, fused_grads), (ref, ref_grads) = results
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(fused_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


class ScaledConv(nn.Conv2d):
    """A Conv2d subclass with another function (as a quantization-aware or reparametrised
    conv would be): a shortcut that reads its weights computes the wrong thing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


def test_pixel_attention_in_cpu_training_calls_a_hooked_or_other_conv():
    """PA's memory-lean training function reads ``pa_conv``'s weights: not where the
    conv has a hook or is not a plain ``nn.Conv2d``; then PA is ``x * sigmoid(conv(x))``
    with the module called."""
    from mmrest.models.layers.embed import PixelAttention, PixelAttentionFunction
    torch.manual_seed(0)
    pa = PixelAttention(8)
    x = torch.randn(2, 8, 9, 13, requires_grad=True)
    plain = pa(x)
    assert plain.grad_fn.name().startswith(PixelAttentionFunction.__name__)  # the shortcut
    handle = pa.pa_conv.register_forward_hook(_doubles)
    _doubles.calls = 0
    out = pa(x)
    assert _doubles.calls == 1
    torch.testing.assert_close(out, x * (2 * nn.functional.conv2d(
        x, pa.pa_conv.weight, pa.pa_conv.bias, padding=1, groups=8)).sigmoid())
    handle.remove()
    scaled = ScaledConv(8, 8, 3, padding=1, groups=8)
    scaled.load_state_dict(pa.pa_conv.state_dict())
    pa.pa_conv = scaled
    torch.testing.assert_close(pa(x), x * scaled(x).sigmoid())


@pytest.mark.parametrize('hooked', ['norm2', 'mlp.fc1', 'mlp.act', 'mlp.fc2', 'attn.proj'])
def test_backward_hooks_run_in_cpu_training(hooked):
    """The blocked LayerNorm + MLP of CPU training is one autograd function that calls
    none of its modules: not where one of them has a backward hook, which then runs
    with the gradients autograd gives the module."""
    torch.manual_seed(0)
    block = ResT('lite', drop_path_rate=0.).train().stage2[0]
    x = torch.randn(2, 7 * 11, block.mlp.fc1.in_features, requires_grad=True)
    seen = []
    handle = block.get_submodule(hooked).register_full_backward_hook(
        lambda m, grad_in, grad_out: seen.append(grad_out[0].clone()))
    block(x, (7, 11)).square().sum().backward()
    handle.remove()
    assert len(seen) == 1, f'the backward hook on {hooked} ran {len(seen)} times'
    grad_x = x.grad.clone()
    x.grad = None
    block_by_hand(block, x, (7, 11)).square().sum().backward()
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-5, atol=1e-5)
