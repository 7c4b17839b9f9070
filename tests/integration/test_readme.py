"""The README's Layout section stays true: every source file and every workspace crate is in it."""
import re
import tomllib

from conftest import ROOT


def layout_entries():
    """{path prefix: the entry's text}, an entry being a line and its indented continuations."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^## Layout\n\n```\n(.*?)```", text, re.M | re.S).group(1)
    entries, current = {}, None
    for line in block.splitlines():
        if line.startswith(" ") and current:
            entries[current] += " " + line.strip()
            continue
        for path in re.findall(r"(?:^|\s|;\s)((?:src|demo|deploy|tests|benches|fuzz)/[\w./-]*)", line):
            entries[path] = line
            current = path
    return entries


def test_every_source_file_is_in_the_layout():
    entries = layout_entries()
    missing = []
    for f in sorted((ROOT / "src").rglob("*.rs")):
        rel = f.relative_to(ROOT).as_posix()
        folder = rel.rsplit("/", 1)[0] + "/"
        if rel in entries:
            continue
        entry = entries.get(folder, "")
        if f.name == "mod.rs" and entry:
            continue  # the folder's own entry describes it
        if folder != "src/" and re.search(rf"\b{re.escape(f.stem)}\b", entry):
            continue
        missing.append(rel)
    assert not missing, f"add these to the README's Layout: {missing}"


def test_every_workspace_crate_is_in_the_layout():
    members = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["members"]
    entries = layout_entries()
    missing = [m for m in members if m != "." and m.rstrip("/") + "/" not in entries]
    assert not missing, f"add these crates to the README's Layout: {missing}"
