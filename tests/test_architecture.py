"""ARCHITECTURE.md's layer table matches the tree: every module is named in its folder's row, every
named module exists, and each layer imports only the layers its row allows (read from the code)."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("errors", "ranges", "stats", "data", "ops", "train", "export", "run", "commands")


def layer_table() -> dict[str, tuple[str, set[str]]]:
    """layer → (its "owns" cell, the layers it may import), from ARCHITECTURE.md."""
    table = {}
    for line in (REPO / "ARCHITECTURE.md").read_text().splitlines():
        match = re.match(r"\| `orpo/(\w+)(?:\.py|/)` \| (.*) \| (.*) \|$", line)
        if match:
            layer, owns, may = match.groups()
            table[layer] = (owns, {name for name in LAYERS if re.search(rf"\b{name}\b", may)} - {layer})
    return table


def imported_layers(path: Path) -> set[str]:
    text = path.read_text()
    return set(re.findall(r"^\s*(?:from|import) orpo\.(\w+)", text, re.M))


def test_the_table_names_every_layer():
    assert set(layer_table()) == set(LAYERS)


def test_every_module_is_in_its_folders_row_and_every_named_module_exists():
    for layer, (owns, _) in layer_table().items():
        if (REPO / "orpo" / f"{layer}.py").is_file():  # a layer of one module
            continue
        folder = REPO / "orpo" / layer
        on_disk = {p.name for p in folder.glob("*.py") if p.name != "__init__.py"}
        named = set(re.findall(r"`(\w+\.py)`", owns))
        assert on_disk == named, f"orpo/{layer}/: on disk {sorted(on_disk)}, in ARCHITECTURE.md {sorted(named)}"


def test_each_layer_imports_only_the_layers_below_it():
    table = layer_table()
    for layer in LAYERS:
        module = REPO / "orpo" / f"{layer}.py"
        paths = [module] if module.is_file() else sorted((REPO / "orpo" / layer).glob("*.py"))
        for path in paths:
            wrong = imported_layers(path) - table[layer][1] - {layer}
            assert not wrong, f"{path.relative_to(REPO)} imports {sorted(wrong)}; its layer may import {sorted(table[layer][1])}"


def test_layers_are_ordered_bottom_up():
    """A layer may only import layers listed before it in LAYERS (no cycles through the table)."""
    table = layer_table()
    for i, layer in enumerate(LAYERS):
        assert table[layer][1] <= set(LAYERS[:i]), layer
