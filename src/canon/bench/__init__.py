"""Speed against torchvision: `canon bench train` times the training step of a canon model and
of torchvision's same architecture (canon.bench.train); `canon bench data` times canon's JPEG
training pipeline against torchvision's standard one doing the same geometry
(canon.bench.data); `canon bench loop` times canon's whole CIFAR training loop against the
plain PyTorch one (canon.bench.loop)."""

DEFAULT_RECIPE = "resnet18-imagenette5"  # whose JPEG pipeline `canon bench data` times
