"""What the attack and defence registries share: adding an entry under its name, and the union of their keys."""


def add(registry, cls, kind, reserved=()):
    """Add cls to registry under cls.name; a name may be registered once and not be a reserved one."""
    if not cls.name or cls.name in registry or cls.name in reserved:
        raise ValueError(f"{kind} name {cls.name!r} is empty, reserved or already registered")
    registry[cls.name] = cls
    return cls


def merged_keys(registry, kind):
    """The config keys of every entry with their defaults; a key shared by two entries needs one default."""
    keys = {}
    for cls in registry.values():
        for key, default in cls.keys.items():
            if key in keys and keys[key] != default:
                raise ValueError(f"{kind} {cls.name} declares '{key}' with default {default!r}, another {kind} "
                                 f"with {keys[key]!r}; a shared key needs one default")
            keys[key] = default
    return keys
