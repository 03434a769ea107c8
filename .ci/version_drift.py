"""Print the installed distributions whose versions differ from a constraints file (`make test-latest`)."""
import importlib.metadata
import re
import sys


def pinned(path: str) -> dict:
    pins = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def main(path: str) -> None:
    pins = pinned(path)
    installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version
                 for d in importlib.metadata.distributions()}
    changed = [(n, pins[n], v) for n, v in sorted(installed.items()) if n in pins and pins[n] != v]
    # torch comes from TORCH_SPEC and the project itself from the checkout: neither belongs in the file
    added = sorted(n for n in installed if n not in pins and n not in ("torch", "pydistill-fused"))
    print(f"newest versions against {path}: {len(changed)} changed, {len(added)} not pinned")
    for name, old, new in changed:
        print(f"  {name}: {old} -> {new}")
    for name in added:
        print(f"  {name}: {installed[name]} (not in {path})")


if __name__ == "__main__":
    main(sys.argv[1])
