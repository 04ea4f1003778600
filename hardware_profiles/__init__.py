"""Hardware profiles (YAML, datasheet units) and the clusters built from them.

* ``load_profile(name_or_path, overrides=None, source=None) -> Profile``: a shipped profile
  (``list_profiles()``) or a YAML file, with dotted-key overrides, validated and converted to
  internal units (us, bytes, bytes/us, FLOP/us) once.
* ``build_cluster(profile, nodes) -> Cluster``: the link graph (GPUs, NVSwitch, NICs, leaf and
  spine switches), routes with deterministic ECMP, and contention-free transfer times.
* ``Profile.to_yaml()`` / ``to_dict()`` write a profile back in datasheet units (calibration
  writes fitted profiles this way); ``override_profile(profile, overrides)`` changes fields.
"""

from hardware_profiles.loader import PACKAGE_DIR, list_profiles, load_profile, override_profile, profile_from_dict
from hardware_profiles.profile import DTYPES, FIELD_BY_PATH, FIELDS, GPU, LINK_CLASSES, Comm, Fabric, Node, Profile
from hardware_profiles.topology import Cluster, build_cluster, ecmp_index

__all__ = [
    "load_profile", "list_profiles", "override_profile", "profile_from_dict", "build_cluster", "ecmp_index",
    "Cluster", "Profile", "GPU", "Node", "Fabric", "Comm", "FIELDS", "FIELD_BY_PATH", "DTYPES", "LINK_CLASSES",
    "PACKAGE_DIR",
]
