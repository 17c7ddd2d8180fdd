"""Natural photos on this machine: Debian's wallpaper packages, one scene per wallpaper, and the
fixed split between scenes a training run may see and scenes only the benchmark sees.

A wallpaper is large (2,560-5,120 px), so one scene gives many images (tiles, random crops).
Split by scene, never by crop: two crops of one scene share light, texture and colour, and a
model trained on one would have half-seen the other. The split is a hash of the scene's name,
so it never changes as packages add or drop wallpapers. Both the benchmark
(``simserve bench copydetect``) and training recipes read the split from here.

    scripts/install-data.sh --photos   # installs the packages
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

# package -> (folder, licence as its Debian copyright file states it)
PACKAGES = {
    "plasma-workspace-wallpapers": ("/usr/share/wallpapers", "GPL-2+ (KDE Visual Design Group)"),
    "ukui-wallpapers": ("/usr/share/backgrounds", "CC-BY-SA-3.0 (Ubuntu Kylin community contributors)"),
    "lomiri-wallpapers": ("/usr/share/backgrounds", "CC-BY-4.0 / CC-BY-SA-3.0 / CC-BY-SA-4.0 / CC0-1.0, per file (authors in the file names)"),
    "gnome-backgrounds": ("/usr/share/backgrounds/gnome", "CC-BY-SA-3.0 (GNOME Project)"),
}
# Scenes that are camera photographs, judged by eye; the rest are drawn or rendered artwork
# (gradients, flat shapes), where a tile can be as featureless as a patch of sky. The benchmark
# reports photographs apart: they are what users index.
PHOTOGRAPHS = frozenset({
    # eval
    "ColdRipple", "Dragonfly_by_Bolly", "Infinite-Sea_by_Aury88", "Kleiber_by_Lukas_Baubkus", "Picture_1A_by_freespace",
    "free_by_Peter_Nerlich", "picosdeeuropa_by_Aitzol_Berasategi", "sunset_by_Aitzol_Berasategi",
    # train
    "Bridge_by_Sander_Klootwijk", "BytheWater", "DarkestHour", "EveningGlow", "FallenLeaf", "Kite", "OneStandsOut", "Path",
    "Picture_0B_by_freespace", "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi", "analogpattern_by_Peter_Nerlich",
    "friends_by_Aitzol_Berasategi", "greentock_by_Peter_Nerlich", "life_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt",
    "summer_1am",
})
EVAL_SHARE = 3  # one scene in three is the benchmark's; the rest may be trained on
_EXTS = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class Scene:
    name: str
    path: Path  # the largest rendering of the wallpaper
    package: str
    licence: str

    @property
    def split(self) -> str:
        return split_of(self.name)

    @property
    def photograph(self) -> bool:
        return self.name in PHOTOGRAPHS


def split_of(name: str) -> str:
    """'eval' or 'train', fixed by the scene's name."""
    return "eval" if int(hashlib.sha256(name.encode()).hexdigest(), 16) % EVAL_SHARE == 0 else "train"


def scenes(split: str | None = None) -> list[Scene]:
    """Every installed wallpaper scene (of one split if given), sorted by name."""
    found: dict[str, Scene] = {}
    for pkg, (folder, licence) in PACKAGES.items():
        for path in _package_files(pkg):
            if path.suffix.lower() not in _EXTS or "screenshot" in path.name or not path.is_file():
                continue
            name = _scene_name(path, folder)
            old = found.get(name)
            if old is None or path.stat().st_size > old.path.stat().st_size:
                found[name] = Scene(name, path, pkg, licence)
    return sorted((s for s in found.values() if split is None or s.split == split), key=lambda s: s.name)


def _package_files(pkg: str) -> list[Path]:
    lists = sorted(Path("/var/lib/dpkg/info").glob(f"{pkg}*.list"))  # lomiri-wallpapers-16.04, ...
    return [Path(line) for f in lists for line in f.read_text().splitlines() if line]


def _scene_name(path: Path, folder: str) -> str:
    """Plasma: the wallpaper's folder (one per scene, many resolutions); GNOME: the design, light
    and dark variants together; others: the file's stem."""
    parts = path.parts
    if "wallpapers" in parts and "contents" in parts:
        return parts[parts.index("contents") - 1]
    return re.sub(r"-[ld]$", "", path.stem)
