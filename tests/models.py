"""Hand-written test models for fusedres.convert (all picklable, all 32x32-friendly)."""
import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------
# CIFAR ResNet with option-A (parameter-free, zero-padded) shortcuts, He et al. 2016
# --------------------------------------------------------------------------------------


class PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the channels."""

    def __init__(self, planes):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)


class CifarBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, inline_pad=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.inline_pad = inline_pad and (stride != 1 or in_planes != planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes)
        self.planes = planes

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.inline_pad:  # the shortcut written in the block's own forward
            p = self.planes // 4
            out = out + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))
        else:
            out += self.shortcut(x)
        out = F.relu(out)
        return out


class CifarResNet(nn.Module):
    def __init__(self, num_blocks=(1, 1, 1), num_classes=10, inline_pad=False):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], 1, inline_pad)
        self.layer2 = self._make_layer(32, num_blocks[1], 2, inline_pad)
        self.layer3 = self._make_layer(64, num_blocks[2], 2, inline_pad)
        self.linear = nn.Linear(64, num_classes)

    def _make_layer(self, planes, n, stride, inline_pad):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(CifarBlock(self.in_planes, planes, s, inline_pad))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# --------------------------------------------------------------------------------------
# Pre-activation ResNet (He et al., "Identity mappings", v2)
# --------------------------------------------------------------------------------------


class PreActBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class PreActResNet(nn.Module):
    def __init__(self, num_blocks=(1, 1, 1), num_classes=10, block=PreActBlock):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        layers = []
        for planes, n, stride in zip((16, 32, 64), num_blocks, (1, 2, 2)):
            for s in [stride] + [1] * (n - 1):
                layers.append(block(self.in_planes, planes, s))
                self.in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(64)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = self.layers(self.conv1(x))
        out = torch.relu(self.bn(out))
        return self.linear(out.mean((2, 3)))


class NormActPreActBlock(PreActBlock):
    """``PreActBlock`` with timm's ``BatchNormAct2d`` (BN and ReLU in one module, as timm's
    ResNet-v2 and DenseNet build them) for bn1 and bn2: the same sites and state_dict."""

    def __init__(self, in_planes, planes, stride=1):
        from timm.layers import BatchNormAct2d

        super().__init__(in_planes, planes, stride)
        self.bn1, self.bn2 = BatchNormAct2d(in_planes), BatchNormAct2d(planes)

    def forward(self, x):
        out = self.bn1(x)
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv2(self.bn2(self.conv1(out)))
        out += shortcut
        return out


class NormActPreActResNet(PreActResNet):
    """``PreActResNet`` built from timm's ``BatchNormAct2d`` (needs timm)."""

    def __init__(self, num_blocks=(1, 1, 1), num_classes=10):
        from timm.layers import BatchNormAct2d

        super().__init__(num_blocks, num_classes, block=NormActPreActBlock)
        self.bn = BatchNormAct2d(64)

    def forward(self, x):
        return self.linear(self.bn(self.layers(self.conv1(x))).mean((2, 3)))


# --------------------------------------------------------------------------------------
# A small hand-written ResNet: functional ReLU, +=, one shared nn.ReLU, Sequential
# downsample, methods besides forward, an unreferenced buffer
# --------------------------------------------------------------------------------------


class TinyBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=None)
        self.relu = nn.ReLU(inplace=True)  # shared by both call sites
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout, momentum=None))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=True), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.block1 = TinyBlock(8, 8, 1)
        self.block2 = TinyBlock(8, 16, 2)
        self.block3 = TinyBlock(16, 16, 1)
        self.head = nn.Linear(16, num_classes)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))  # never read

    def forward_features(self, x):
        x = self.stem(x)
        x = self.block3(self.block2(self.block1(x)))
        return x

    def forward(self, x):
        x = self.forward_features(x)
        x = x.mean((2, 3))
        return self.head(F.relu(x, inplace=False))


# --------------------------------------------------------------------------------------
# Models with nothing to fuse, or with options the converter must leave alone
# --------------------------------------------------------------------------------------


class NoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        out = F.relu(self.bn(self.conv(x)))
        if out.sum() > 0:
            out = out * 2
        return out


class Hooked(nn.BatchNorm2d):
    """A BatchNorm2d subclass with its own forward: must not be replaced."""

    def forward(self, x):
        return super().forward(x) * 0.5


class Awkward(nn.Module):
    """BN output used twice, a subclassed BN, ReLU6, track_running_stats=False,
    dual BNs with different momenta, an untraceable child, a BN with a hook."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn_twice = nn.BatchNorm2d(4)
        self.bn_sub = Hooked(4)
        self.bn_relu6 = nn.BatchNorm2d(4)
        self.bn_nostats = nn.BatchNorm2d(4, track_running_stats=False)
        self.conv2 = nn.Conv2d(4, 4, 3, 1, 1, bias=False)
        self.bn_main = nn.BatchNorm2d(4, momentum=0.1)
        self.bn_short = nn.BatchNorm2d(4, momentum=0.3)
        self.bn_hooked = nn.BatchNorm2d(4)
        self.bn_hooked.register_forward_hook(lambda m, i, o: o * 1.0)
        self.child = Untraceable()
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.conv1(x)
        a = self.bn_twice(y)
        out = self.relu(a) + a  # used twice
        out = self.relu(self.bn_sub(out))
        out = F.relu6(self.bn_relu6(out))
        out = self.relu(self.bn_nostats(out))
        out = self.relu(self.bn_main(self.conv2(out)) + self.bn_short(out))
        out = self.relu(self.bn_hooked(out))
        return self.child(out)


# a module-level hook function would be picklable; the lambda above makes Awkward
# unpicklable on purpose-free grounds, so tests pickle the other models.
