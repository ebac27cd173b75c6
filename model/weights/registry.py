"""Named checkpoints, as data: where each file comes from, its licence, what it is, what to check it against.

`--checkpoint NAME` resolves through this table (model.weights.loading); model.weights.download fetches,
verifies and caches the file under `cache_dir()/weights/NAME/`. A mirror serves every file as
`<mirror>/<filename>`.

Sizes and hashes: neither the authors nor DINOv2 publish a sha256 or byte size for these files, and none
could be downloaded where this table was written, so both are `None` ("unknown") rather than guessed. The
first download records the file's sha256 beside it and every later load checks the file against that
record. `approx_size` is an estimate from the architecture (float32 parameters, counted with this
project's model; for the authors' files plus Adam state for the trained parts), for display only.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.errors import CheckpointError
from model.weights.formats import CheckpointFormat

DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
# The form a browser's "download anyway" link takes; large files answer it with a confirmation page
# (model.weights.download handles it).
DRIVE_DOWNLOAD_URL = "https://drive.google.com/uc?export=download&id={file_id}"

SELAVPR_LICENCE = (
    "MIT (the SelaVPR repository's licence; the release names no other for the weights, which are "
    "fine-tuned from Apache-2.0 DINOv2 ViT-L/14)"
)
DINOV2_LICENCE = "Apache-2.0 (the DINOv2 README: code and model weights)"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    filename: str  # the cached file's name, and its name under a mirror
    url: str  # where it is fetched from when no mirror is set
    format: CheckpointFormat
    licence: str
    description: str
    use: str  # which job this checkpoint is for
    approx_size: str  # an estimate for display; see the module docstring
    homepage: str
    size_bytes: int | None = None  # exact size, None where unknown
    sha256: str | None = None  # None where unknown: the first download's hash is recorded and checked
    drive_file_id: str | None = None  # set for files on Google Drive (a confirmation page may come first)

    def source_url(self, mirror: str | None = None) -> str:
        """The mirror's copy when a mirror is set (`<mirror>/<filename>`), else the original URL."""
        return f"{mirror.rstrip('/')}/{self.filename}" if mirror else self.url


def _selavpr(name: str, filename: str, file_id: str, description: str, use: str) -> RegistryEntry:
    return RegistryEntry(
        name=name,
        filename=filename,
        url=DRIVE_DOWNLOAD_URL.format(file_id=file_id),
        drive_file_id=file_id,
        format=CheckpointFormat.SELAVPR_AUTHORS,
        licence=SELAVPR_LICENCE,
        description=description,
        use=use,
        approx_size="~1.4-1.9 GB",  # 357M float32 parameters, plus Adam state for 53M if it was saved
        homepage="https://github.com/Lu-Feng/SelaVPR",
    )


def _dinov2(size: str, approx_size: str, registers: bool) -> RegistryEntry:
    base = f"dinov2_vit{size}14"
    full = f"{base}_reg4" if registers else base
    arch = {"s": "ViT-S/14", "b": "ViT-B/14", "l": "ViT-L/14", "g": "ViT-g/14"}[size]
    return RegistryEntry(
        name=f"dinov2-vit{size}14" + ("-reg4" if registers else ""),
        filename=f"{full}_pretrain.pth",
        # DINOv2's hub code: <base>/<base>/<full>_pretrain.pth (the register files sit in the plain folder)
        url=f"{DINOV2_BASE_URL}/{base}/{full}_pretrain.pth",
        format=CheckpointFormat.DINOV2,
        licence=DINOV2_LICENCE,
        description=f"official DINOv2 {arch} backbone" + (" with 4 registers" if registers else ""),
        use="a backbone to train from (selavpr train) or to run training-free with patch-token matching",
        approx_size=approx_size,
        homepage="https://github.com/facebookresearch/dinov2",
    )


ENTRIES: tuple[RegistryEntry, ...] = (
    _selavpr(
        "selavpr-msls",
        "SelaVPR_msls.pth",
        "1vy05l0JTEgr6n8iSoz_P_yjWfEzFPAkV",
        "the authors' SelaVPR ViT-L/14, fine-tuned on MSLS (R@1 90.8 MSLS-val, 85.2 Nordland, 99.8 St Lucia)",
        "diverse scenes: suburban, rural, seasonal and day/night changes",
    ),
    _selavpr(
        "selavpr-pitts30k",
        "SelaVPR_pitts30k.pth",
        "1LKTZZRHfMH3dY3UPagCt2TIlMN5LguGO",
        "the authors' SelaVPR ViT-L/14, fine-tuned on MSLS then Pitts30k (R@1 94.0 Tokyo 24/7, 92.8 "
        "Pitts30k, 95.7 Pitts250k)",
        "urban street-level scenes",
    ),
    _selavpr(
        "selavpr-reg4-msls",
        "SelaVPR_reg4_msls.pth",
        "16Qkr6MGe3k0kYtFfw3YLQXZFn4c9YvJk",
        "the authors' SelaVPR ViT-L/14 with 4 registers (DINOv2-reg backbone), fine-tuned on MSLS",
        "diverse scenes, the register variant",
    ),
    *(
        _dinov2(size, approx, registers)
        for size, approx in (("s", "~88 MB"), ("b", "~346 MB"), ("l", "~1.2 GB"), ("g", "~4.5 GB"))  # float32
        for registers in (False, True)
    ),
)

REGISTRY: dict[str, RegistryEntry] = {entry.name: entry for entry in ENTRIES}


def is_registered(spec: object) -> bool:
    return isinstance(spec, str) and spec in REGISTRY


def get_entry(name: str) -> RegistryEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise CheckpointError(
            f"{name!r} is not a named checkpoint; known names: {', '.join(sorted(REGISTRY))}"
        ) from None
