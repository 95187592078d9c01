"""Exporting trained parts into other projects' checkpoint layouts (Bagel's understanding ViT: `unimm.export.bagel`)."""

from unimm.export.bagel import (
    BAGEL_VIT_MANIFEST,
    BagelExportReport,
    BagelNaViTReference,
    BagelViTArchitecture,
    bagel_vit_state_dict,
    export_bagel_vit,
    verify_bagel_export,
)

__all__ = [
    "BAGEL_VIT_MANIFEST",
    "BagelExportReport",
    "BagelNaViTReference",
    "BagelViTArchitecture",
    "bagel_vit_state_dict",
    "export_bagel_vit",
    "verify_bagel_export",
]
