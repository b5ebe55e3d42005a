"""The DFAD image generator (Fang et al. 2019; METHOD.md section 4): noise z ~ N(0, I) to a normalised image batch.

DCGAN-style: linear to 2*ngf x (s/4) x (s/4), two nearest-neighbour x2 upsamplings with conv-BN-LeakyReLU,
a conv to the image channels, tanh, and a BatchNorm without affine parameters, so each output channel has
zero mean and unit variance over the batch, the statistics of a dataset-normalised image.
"""
from torch import nn


class Generator(nn.Module):
    def __init__(self, nz=256, ngf=64, img_size=32, channels=3):
        super().__init__()
        if img_size % 4:
            raise ValueError(f"img_size must be divisible by 4 (two x2 upsamplings), got {img_size}")
        self.nz, self.init_size = nz, img_size // 4
        wide = 2 * ngf
        self.project = nn.Linear(nz, wide * self.init_size ** 2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(wide),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(wide, wide, 3, padding=1, bias=False),  # BN follows: a bias would be cancelled
            nn.BatchNorm2d(wide),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(wide, ngf, 3, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, channels, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z):
        x = self.project(z).view(z.shape[0], -1, self.init_size, self.init_size)
        return self.body(x)
