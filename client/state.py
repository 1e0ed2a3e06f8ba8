"""Site state folder: site-local (never shared) layers, written atomically, reloaded on restart."""

from __future__ import annotations

from pathlib import Path

import torch

from fedseg.common.atomic import atomic_torch_save

LOCAL_LAYERS_FILE = "local_layers.pt"


class SiteState:
    """The site's own state folder (node config ``state-dir``); nothing here is ever sent.

    Args:
        state_dir: folder, created on first write.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)

    @property
    def local_layers_path(self) -> Path:
        """Where the site-local tensors live."""
        return self.dir / LOCAL_LAYERS_FILE

    def load_local_layers(self) -> dict[str, torch.Tensor] | None:
        """The site-local tensors saved by the last round, or None before the first round.

        Raises:
            RuntimeError: the file exists but cannot be read (named in the message).
        """
        path = self.local_layers_path
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any load failure means a damaged file
            raise RuntimeError(f"{path}: cannot read the site's local layers ({err})") from err
        return saved["tensors"]

    def save_local_layers(self, tensors: dict[str, torch.Tensor], server_round: int) -> None:
        """Atomically replace the site-local tensors (tagged with the round that produced them)."""
        atomic_torch_save(self.local_layers_path, {"round": server_round, "tensors": tensors})
