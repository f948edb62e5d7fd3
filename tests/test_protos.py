"""The committed gRPC stubs are what `make protos` generates from protos/ today."""

from pathlib import Path

from gradalign_common.protogen import STUB_DIR, generate


def test_generated_stubs_are_fresh(tmp_path: Path):
    fresh = {p.name: p.read_text() for p in generate(tmp_path)}
    committed = {p.name: p.read_text() for p in STUB_DIR.iterdir() if p.is_file() and p.suffix in (".py", ".pyi")}
    assert sorted(fresh) == sorted(committed), "stub files differ: run `make protos`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated stubs {stale}: run `make protos`"
