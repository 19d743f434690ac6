"""docs/cli.md's tables of flags are the tools' own: generated, and checked here."""

import argparse
import runpy
from typing import Optional

from conftest import REPO
from llama import cli

MAKE = REPO / "docs" / "make_cli_tables.py"


def test_the_flag_tables_in_docs_cli_md_are_the_tools_own():
    make = runpy.run_path(str(MAKE), run_name="not_main")
    documented = make["documented"]((REPO / "docs" / "cli.md").read_text())
    assert documented == make["tables"](), (
        "docs/cli.md's tables of flags differ from the tools' flags; "
        "regenerate them with: python docs/make_cli_tables.py"
    )


def test_every_tool_has_a_table():
    make = runpy.run_path(str(MAKE), run_name="not_main")
    tables = make["tables"]()
    for script in make["scripts"]():
        assert f"### `python {script}`" in tables
    for command in ("llama.tiny", "llama.reshard", "llama.quantize", "llama.convert_hf to-meta",
                    "llama.convert_hf to-hf"):
        assert f"### `python -m {command}`" in tables


def _main(max_gen_len: Optional[int] = None, system: str = "a|b", greedy: bool = False):
    """Do it.

    Args:
        max_gen_len: most tokens; none: all 100%
        system: the system prompt
        greedy: no sampling
    """


def test_a_table_says_what_each_flag_takes():
    table = cli.flag_table(cli.parser_for(_main)).splitlines()
    assert table[2:] == [
        "| `--max_gen_len` | an integer or `none` | `none` | most tokens; none: all 100% |",
        "| `--system` | text | `a\\|b` | the system prompt |",
        "| `--greedy` | `true` or `false`; alone: true | `false` | no sampling |",
    ]
    parser = cli.ArgumentParser()
    parser.add_argument("src", help="where from")
    parser.add_argument("--mp", type=int, required=True, help="shards")
    parser.add_argument("--n-layers", type=int, default=2)  # also --n_layers, hidden
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="%(choices)s only")
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fast", action="store_true", help="go")
    assert cli.flag_table(parser).splitlines()[2:] == [
        "| `SRC` | text | required | where from |",
        "| `--mp` | an integer | required | shards |",
        "| `--n-layers` | an integer | `2` |  |",
        "| `--dtype` | `float32` or `bfloat16` | none | ['float32', 'bfloat16'] only |",
        "| `--fast` | no value (a switch) | off | go |",
    ]
