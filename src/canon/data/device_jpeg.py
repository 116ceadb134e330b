"""ImageNet-style JPEG training with the decoding and the augmentation on the training device:
loader processes only read file bytes; the main process decodes a whole batch at once
(torchvision.io.decode_jpeg: nvJPEG on a GPU, libjpeg-turbo on the CPU) and crops, resizes,
reflects, colour-shifts and normalises it with tensor ops there. On a GPU that takes the
work that bounds ImageNet training off the host's cores; on a CPU it only moves it into the
main process, so it is off unless train.decode_on_device asks for it.

The crops are the papers' (GoogLeNet s6's random area and aspect ratio, or VGG s3.1 / ResNet
s3.4's random shorter side and a fixed-size crop), drawn by the per-image pipeline's own code
(canon.data.transforms) from the seed the per-image pipeline gives the sample, in its order: the
same boxes, colour shifts and reflections as the CPU path, whatever batch a sample falls in.
Each crop is cut and resized as the CPU path does it, with the same antialiased bilinear filter
(TF.resize), in float: its pixels are the CPU path's but for that path's rounding of a resized
area crop to uint8 (tests/test_data_device_jpeg.py). nvJPEG's inverse DCT and chroma upsampling
differ from libjpeg-turbo's by a grey level here and there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from canon.data.decoding import jpeg_frame, libjpeg_errors
from canon.data.folders import FolderImages
from canon.data.geometry import cut, resize_image
from canon.data.sampling import sample_seed
from canon.data.transforms import (
    AreaCropFirst,
    CropFirst,
    FancyPCA,
    RandomAreaCrop,
    RandomCrop,
    RandomFlip,
    RescaleShorter,
)

Window = tuple[int, int, int, int]  # top, left, height, width in pixels


@dataclass(frozen=True)
class Draws:
    """One image's random choices: its crop, as the window `first` of the image resized to
    `size` (height, width) and cut to the window `then` of that; its colour shift alpha
    (None: no shift); its reflection."""

    first: Window
    size: tuple[int, int]
    then: Window
    alpha: torch.Tensor | None
    flip: bool

    def crop(self, image: torch.Tensor) -> torch.Tensor:
        """The crop of uint8 `image`, in float 0-255. A scale-jittered crop resizes the whole
        image, where the CPU path resamples the window alone (resample_window): on a GPU one
        resize kernel per image costs less than that function's launch per filter tap."""
        return cut(resize_image(cut(image, self.first).float(), *self.size, "bilinear"),
                   self.then)


# An h x w image's draws from its own generator.
DrawFor = Callable[[int, int, torch.Generator], Draws]


class FileBytes(Dataset):
    """Key `epoch * n + i` -> (key, the raw bytes of image i's file, its label): all a loader
    process does for on-device decoding."""

    def __init__(self, folder: FolderImages) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: int) -> tuple[int, torch.Tensor, int]:
        """No bytes for a file that cannot be read (gone, unreadable, empty): decode_batch
        hands it to the folder's decoder, which skips it with a warning, or stops a strict
        run naming it, as the per-image pipeline does."""
        index = key % len(self.folder)
        try:
            data = Path(self.folder.paths[index]).read_bytes()
        except OSError:
            data = b""
        image = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if data
                 else torch.empty(0, dtype=torch.uint8))
        return key, image, self.folder.labels[index]


def collate_files(items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys, the files' bytes end to end, their lengths, labels) of a batch: one tensor of
    bytes crosses from a loader process, not one per file (each would hold a descriptor)."""
    keys, files, labels = zip(*items, strict=True)
    return (torch.tensor(keys), torch.cat(files), torch.tensor([len(f) for f in files]),
            torch.tensor(labels))


def decode_batch(files: list[torch.Tensor], keys: torch.Tensor, folder: FolderImages,
                 device: torch.device) -> list[torch.Tensor | None]:
    """The batch's images, uint8 RGB 3 x H x W on `device`. Plain JPEGs are decoded together
    (decode_jpeg); canon's own decoder, on the CPU, takes the others and applies the folder's
    checks as the per-image pipeline does: other formats (a PNG named .JPEG), EXIF orientation
    (which nvJPEG ignores), images over data.max_image_pixels, CMYK and corrupt JPEGs. None
    for a file it cannot read (FolderImages warns and the run counts it as skipped; with
    strict data it stops the run, naming the file)."""
    count, images = len(folder), [None] * len(files)
    plain = [i for i, data in enumerate(files) if _plain_jpeg(data, folder.max_pixels)]
    if plain:
        decoded = _decode_jpegs([files[i] for i in plain], device)
        if decoded is None:  # one bad file fails the whole call: decode them one by one
            decoded = [_decode_one(files[i], device) for i in plain]
        for i, image in zip(plain, decoded, strict=True):
            images[i] = image
    for i, image in enumerate(images):
        if image is None:
            index = int(keys[i]) % count
            fallback = (folder.image_from_bytes(index, files[i].numpy().tobytes())
                        if len(files[i]) else folder.load_image(index))  # says why it failed
            images[i] = None if fallback is None else fallback.to(device)
    return images


def _decode_jpegs(files: list[torch.Tensor], device: torch.device
                  ) -> list[torch.Tensor] | None:
    """decode_jpeg's RGB images of `files`, or None when it refuses one of them. Running out
    of GPU memory is not a bad file: it stops the run as anywhere else."""
    with libjpeg_errors():
        try:
            if device.type == "cuda":
                return _decode_on_own_stream(files, device)
            return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, UserWarning):
            return None


_DECODE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _decode_on_own_stream(files: list[torch.Tensor], device: torch.device
                          ) -> list[torch.Tensor]:
    """nvJPEG's decoding with a stream of its own current. torchvision allocates the images
    on the current stream, then has nvJPEG write them from a private stream that does not
    wait for it (pytorch/vision#9606): on the training stream, the allocator hands it blocks
    that the previous step's queued kernels have yet to read, and the step trains on the
    overwritten values (ResNet-50's loss was NaN by the third step on an H200). The images
    are then marked as in use by the training stream, whose kernels read them: their blocks
    go to no later decode before those kernels have run."""
    training = torch.cuda.current_stream(device)
    if device not in _DECODE_STREAMS:
        _DECODE_STREAMS[device] = torch.cuda.Stream(device)
    decoding = _DECODE_STREAMS[device]
    with torch.cuda.stream(decoding):
        images = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    training.wait_stream(decoding)
    for image in images:
        image.record_stream(training)
    return images


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """One file by decode_jpeg; None for canon's decoder to take it."""
    decoded = _decode_jpegs([data], device)
    return None if decoded is None else decoded[0]


_END_SEARCH = 64  # bytes at a JPEG's end where its end-of-image marker must be


def _plain_jpeg(data: torch.Tensor, max_pixels: int) -> bool:
    """An 8-bit greyscale or YCbCr JPEG (baseline or progressive) without EXIF data, within
    max_pixels (0: no limit), that ends: what decode_jpeg turns into the pixels canon's decoder
    gives. CMYK and 12-bit JPEGs, which nvJPEG may refuse or convert otherwise, are not, nor
    a file cut short, which canon's decoder refuses where nvJPEG might fill the rest in grey.
    Its end-of-image marker is near the end (a few bytes of padding may follow): scan data
    never holds one, since an 0xFF byte there is followed by 0x00 or a restart marker."""
    head = data[:65_536].numpy().tobytes()  # the APP1 (EXIF) segment comes first and is < 64 KB
    frame = jpeg_frame(head) if head[:2] == b"\xff\xd8" else None
    ends = b"\xff\xd9" in data[-_END_SEARCH:].numpy().tobytes()
    if frame is None or not ends or b"Exif\x00\x00" in head:
        return False
    width, height, components, precision = frame
    return (components in (1, 3) and precision == 8 and width > 0 and height > 0
            and (not max_pixels or width * height <= max_pixels))


def _flip(flip: bool, generator: torch.Generator) -> bool:
    return flip and RandomFlip.draw(generator)


def _alpha(fancy_pca: FancyPCA | None, generator: torch.Generator) -> torch.Tensor | None:
    return None if fancy_pca is None else fancy_pca.alpha(generator)


def area_draws(crop: RandomAreaCrop, fancy_pca: FancyPCA | None, flip: bool) -> DrawFor:
    """GoogLeNet s6's pipeline (RandomAreaCrop, colour shift, reflection), in its order."""

    def draw(height: int, width: int, generator: torch.Generator) -> Draws:
        box, whole = crop.box(height, width, generator), (0, 0, crop.size, crop.size)
        return Draws(box, (crop.size, crop.size), whole, _alpha(fancy_pca, generator),
                     _flip(flip, generator))

    return draw


def scale_draws(rescale: RescaleShorter, crop: RandomCrop, fancy_pca: FancyPCA | None,
                flip: bool) -> DrawFor:
    """VGG s3.1 / ResNet s3.4 (CropFirst: shorter side S, colour shift, a crop x crop window
    of the rescaled image, reflection), in its order; the window as a box of the original."""

    def draw(height: int, width: int, generator: torch.Generator) -> Draws:
        scaled_h, scaled_w = rescale.target_size(height, width, generator)
        alpha = _alpha(fancy_pca, generator)
        top, left = crop.box(scaled_h, scaled_w, generator)
        return Draws((0, 0, height, width), (scaled_h, scaled_w),
                     (top, left, crop.size, crop.size), alpha, _flip(flip, generator))

    return draw


class DeviceCrops:
    """A batch of decoded images (a list, sizes differing) to B x 3 x size x size floats on
    their device. Each image draws from a generator of its own, seeded as
    canon.data.sampling.SeededSamples seeds the per-image pipeline and drawing in its order,
    so its box, colour shift and reflection are the ones the CPU pipeline would take; the
    crops are cut and resized as there (Draws.crop), shifted, normalised by a channel mean
    (and std) and reflected."""

    def __init__(self, size: int, draw: DrawFor, mean: torch.Tensor, std: torch.Tensor | None,
                 fancy_pca: FancyPCA | None) -> None:
        self.size, self.draw, self.fancy_pca = size, draw, fancy_pca
        self.mean, self.std = mean.view(1, 3, 1, 1), None if std is None else std.view(1, 3, 1, 1)
        self._constants: dict[torch.device, tuple] = {}

    def draws(self, images: list[torch.Tensor], keys: torch.Tensor, seed: int, set_size: int
              ) -> list[Draws]:
        """Each image's draws, from the seed of its key (`epoch * set_size + index`)."""
        return [self.draw(*image.shape[-2:], torch.Generator().manual_seed(
                    sample_seed(seed, *divmod(int(key), set_size))))
                for image, key in zip(images, keys, strict=True)]

    def __call__(self, images: list[torch.Tensor], keys: torch.Tensor, seed: int,
                 set_size: int) -> torch.Tensor:
        device = images[0].device
        chosen = self.draws(images, keys, seed, set_size)
        crops = torch.stack([d.crop(image) for d, image in zip(chosen, images, strict=True)]
                            ).div_(255)
        mean, std, fancy_pca = self._on(device)
        if fancy_pca is not None:
            alpha = torch.stack([d.alpha for d in chosen]).to(device, non_blocking=True)
            crops += fancy_pca.shift(alpha).view(-1, 3, 1, 1)
        crops -= mean
        if std is not None:
            crops /= std
        flips = torch.tensor([d.flip for d in chosen]).to(device, non_blocking=True)
        crops = torch.where(flips.view(-1, 1, 1, 1), crops.flip(3), crops)
        return crops.contiguous(memory_format=torch.channels_last)

    def _on(self, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor | None, FancyPCA | None]:
        """The mean, std and colour shift's basis on `device`, moved once."""
        if device not in self._constants:
            self._constants[device] = (
                self.mean.to(device), None if self.std is None else self.std.to(device),
                None if self.fancy_pca is None else self.fancy_pca.to(device))
        return self._constants[device]

    @classmethod
    def of(cls, transform: object) -> DeviceCrops | None:
        """The on-device form of a training transform (canon.data.transforms'
        training_transform), or None where it has none: AlexNet's and ZFNet's fixed squares,
        a mean image (resampled per crop on the CPU path), GoogLeNet s6's photometric
        distortions or random interpolation methods, filters other than bilinear."""
        if isinstance(transform, CropFirst):
            rescale, crop = transform.rescale, transform.crop
            if not (isinstance(rescale, RescaleShorter) and isinstance(crop, RandomCrop)
                    and crop.padding == 0 and rescale.interpolation == "bilinear"):
                return None
            normalize, fancy_pca = transform.normalize, transform.fancy_pca
            draw = scale_draws(rescale, crop, fancy_pca, transform.flip is not None)
        elif isinstance(transform, AreaCropFirst):
            crop = transform.crop
            if crop.interpolations != ("bilinear",) or transform.photometric is not None:
                return None
            normalize, fancy_pca = transform.normalize, transform.fancy_pca
            draw = area_draws(crop, fancy_pca, transform.flip is not None)
        else:
            return None
        if normalize.mean.shape[-2:] != (1, 1):
            return None
        return cls(crop.size, draw, normalize.mean.flatten(),
                   None if normalize.std is None else normalize.std.flatten(), fancy_pca)


class DeviceDecodedBatches:
    """The training loader for on-device decoding: a DataLoader of FileBytes batches
    (collate_files), decoded and augmented on `device` in the main process."""

    def __init__(self, loader: Iterable, folder: FolderImages, augment: DeviceCrops, seed: int,
                 device: torch.device | str) -> None:
        self.loader, self.folder, self.augment, self.seed = loader, folder, augment, seed
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for keys, data, lengths, labels in self.loader:
            files = list(torch.split(data, lengths.tolist()))
            decoded = decode_batch(files, keys, self.folder, self.device)
            kept = [i for i, image in enumerate(decoded) if image is not None]
            labels = labels[kept].to(self.device, non_blocking=True)
            if not kept:  # the trainer counts them as skipped
                yield torch.empty(0), labels
                continue
            images = [decoded[i] for i in kept]
            yield self.augment(images, keys[kept], self.seed, len(self.folder)), labels
