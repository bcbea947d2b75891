"""The image catalogue: which image profiles this server has built, and what each carries."""

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from controller.config import Config
from controller.errors import FailedPrecondition
from controller.runtime.container import ContainerRuntime

# The image label that lists what an image carries (written by sandbox-image/build.sh).
LABEL_MANIFEST = "io.petri.manifest"


@dataclass(frozen=True)
class ImageProfile:
    profile: str
    python_version: str
    os: str
    packages: dict[str, str]
    size_bytes: int
    create_time: datetime
    is_default: bool


class ImageCatalogue:
    def __init__(self, config: Config, containers: ContainerRuntime) -> None:
        self._config = config
        self._containers = containers

    def __repr__(self) -> str:
        return f"<ImageCatalogue {self._config.image_repository}>"

    async def exists(self, profile: str) -> bool:
        return await self._containers.image_exists(self._config.image_for(profile))

    async def require(self, profile: str) -> None:
        """FailedPrecondition, saying how to build it, unless the profile's image exists."""
        if not await self.exists(profile):
            image = self._config.image_for(profile)
            raise FailedPrecondition(
                f"image profile {profile!r} is not available on this server (no image {image}); "
                f"an operator can build it with sandbox-image/build.sh {profile}"
            )

    async def profiles(self) -> list[ImageProfile]:
        """The profiles built on this server, with their manifests (the images' labels)."""
        profiles = []
        images = await self._containers.list_images(self._config.image_repository)
        for image in sorted(images, key=lambda i: i.tag):
            try:
                manifest = json.loads(image.labels.get(LABEL_MANIFEST, "{}"))
            except ValueError:
                manifest = {}
            packages = manifest.get("packages") if isinstance(manifest, dict) else None
            profiles.append(
                ImageProfile(
                    profile=image.tag,
                    python_version=str(manifest.get("python", "")),
                    os=str(manifest.get("os", "")),
                    packages={str(k): str(v) for k, v in (packages or {}).items()},
                    size_bytes=image.size_bytes,
                    create_time=datetime.fromtimestamp(image.created, UTC),
                    is_default=image.tag == self._config.default_image_profile,
                )
            )
        return profiles
