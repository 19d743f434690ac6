"""Command lines that check their flags before doing any work and fail in one line.

A script describes its flags once, as the keyword parameters of a typed
`main` with a docstring, and hands it to `run`:

    def main(ckpt_dir: Optional[str] = None, temperature: float = 0.6):
        \"\"\"Complete a few prompts.

        Args:
            ckpt_dir: the checkpoint directory
            temperature: 0 for greedy decoding
        \"\"\"

    if __name__ == "__main__":
        run(main)

`run` builds an argparse parser from the signature, parses the whole
command line before calling `main`, and then calls it. It takes the command
lines of Meta's `fire.Fire(main)` scripts too:

- values in the order of the parameters, without flags (Meta's
  `example_text_completion.py llama-2-7b/ tokenizer.model`), mixed with
  flags as fire allows; the Nth value is always the Nth parameter, so one
  also given by its flag is refused, naming it;
- `--name value`, `--name=value`, `-name`, with `-` or `_` in the name
  (`--max-seq-len`); a `bool` flag alone means true, `--noflag` false.

So:

- an unknown flag fails at once, naming it and the closest known flag;
  one-letter flags (fire's `-t` for the one parameter starting with t) are
  refused, as are abbreviations: a parameter added later would change them;
- `-h`/`--help` lists each flag with its meaning (from the docstring's
  `Args:`), its type and its default;
- text stays text: `--system None` is the string "None", and `1e3` or
  `[INST]` reach a `str` parameter as typed (fire reads values as Python
  literals). An `Optional[int]` or `Optional[float]` flag takes `none`
  (or fire's `None`) for None; a `bool` flag is `--flag`, `--noflag`, or
  `--flag true|false`; a `Literal[...]` flag takes one of its values;
- a user error (see `is_user_error`) prints one line, `error: ...`, once
  however many ranks meet it (rank 0's; `error: rank N: ...` for one that only
  rank N met, see `report_error`), and exits with status 1 (2 for a bad command
  line); a real bug still shows its traceback. `LLAMA_TRACEBACK=1` shows it for
  every error.

This module imports nothing heavy, so `--help` and a misspelled flag are
answered in a fraction of a second; `main` imports torch when it runs.
This is why the scripts do not run `fire` itself, as Meta's reference does:
fire reports an unknown flag only after `main` has returned (after loading
the weights and generating), turns `--temperature` alone into True and
`--flag false` into the (true) string "false", and takes `-h` for any flag
starting with h (`--heartbeat_s` in chat.py). tests/test_fire_command_lines.py
runs the same command lines through fire and through this parser.
"""

import argparse
import difflib
import importlib.util
import inspect
import linecache
import os
import re
import sys
import typing
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from llama import atomic  # light: no torch

_PACKAGE_DIR = Path(__file__).resolve().parent


def is_first_rank() -> bool:
    """True unless this process is a torchrun worker other than global rank 0.

    A RANK that is not a number counts as rank 0, so that the error naming it is shown."""
    rank = os.environ.get("RANK", "0").strip()
    return not rank.isdigit() or int(rank) == 0


def print_error(message: str) -> None:
    """`error: message` in one line on stderr, from rank 0 only."""
    if is_first_rank():
        print(f"error: {one_line(message)}", file=sys.stderr, flush=True)


def report_error(error: BaseException) -> None:
    """`error: ...` in one line for `error`, which ends this process, shown once however
    many ranks meet it.

    Before a process group exists every rank has the same command line and files, so
    rank 0 shows the error for all (`print_error`). Once a group of several ranks
    exists, an error may be one rank's own (its shard damaged): that rank shows it as
    `error: rank N: ...` unless rank 0 shows an error from the same place
    (`llama.distributed.claim_error`).
    """
    message = str(error) or type(error).__name__
    distributed = sys.modules.get("llama.distributed")  # imported by anything that starts a group
    if distributed is None or not distributed.in_a_group_of_several():
        print_error(message)
        return
    prefix = distributed.claim_error(_raise_site(error))
    if prefix is not None:
        print(f"error: {prefix}{one_line(message)}", file=sys.stderr, flush=True)


def _innermost_frame(error: BaseException):
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb


def _raise_site(error: BaseException) -> str:
    """`error`'s type and the file and line that raised it: what the same check failing
    on several ranks has in common, whatever each message names."""
    tb = _innermost_frame(error)
    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
    return f"{type(error).__name__}@{where}"


def one_line(message: str) -> str:
    """A multi-line message joined into one line (a list after a colon stays readable)."""
    message = re.sub(r":\s*\n\s*", ": ", message.strip())
    return re.sub(r"\s*\n\s*", "; ", message)


# --- argument parsing ---


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; each flag's help ends with its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or action.required
            or default is argparse.SUPPRESS
            or "(default:" in text
            or (default is None and re.search(r"\bnone\b", text))  # the help says what none means
        ):
            return text
        return f"{text} (default: {_default_text(default).replace('%', '%%')})".strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse that prints errors in one line and names the closest flag.

    Abbreviated flags are refused (`--temp` is not `--temperature`), so that
    a flag added later cannot change what an old command line means.
    Help is printed by rank 0 only, and shows each flag's default.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        """As argparse's; a flag spelled with - also answers to _, and the other way
        round (`--max_seq_len`, `--max-seq-len`). --help shows the spelling given."""
        action = super().add_argument(*names, **kwargs)
        aliases = []
        for name in names:
            if name.startswith("--") and ("-" in name[2:] or "_" in name[2:]):
                body = name[2:]
                other = "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))
                if other not in self._option_string_actions and other not in aliases:
                    aliases.append(other)
        if aliases:
            hidden = {k: v for k, v in kwargs.items() if k != "required"}
            super().add_argument(
                *aliases, **{**hidden, "dest": action.dest, "default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
            )
        return action

    def parse_known_args(self, args=None, namespace=None):
        if not getattr(self, "_is_subparser", False):
            # Unknown flags first, so that one is named even when a required argument is missing too.
            known = {option for option, _ in self._all_flags()} | {"-h", "--help"}
            for token in sys.argv[1:] if args is None else args:
                if token == "--":
                    break
                if token.startswith("--") and token.split("=", 1)[0] not in known:
                    self.error(self._unknown_message([token]))
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and not getattr(self, "_is_subparser", False):
            self.error(self._unknown_message(extras))
        return namespace, extras

    def _unknown_message(self, extras: List[str]) -> str:
        flags = [a for a in extras if a.startswith("-")]
        if not flags:
            return f"unexpected argument {extras[0]!r}"
        flag = flags[0].split("=", 1)[0]
        if flag in {option for option, _ in self._all_flags()}:  # another subcommand's
            return f"flag {flag} does not apply to this command (its --help lists the flags)"
        if re.fullmatch(r"-[A-Za-z]", flag):  # fire's shortcut for the one parameter with that initial
            full = sorted({shown for _, shown in self._all_flags() if shown[2:3].lower() == flag[1].lower()})
            named = ": " + ", ".join(full) if full else ""
            return f"unknown flag {flag}; flags are written in full{named} (--help lists the flags)"
        # Compared with - and _ alike; the flag suggested is spelled as --help shows it.
        known = {alias.replace("-", "_"): shown for alias, shown in self._all_flags()}
        close = difflib.get_close_matches(flag.replace("-", "_"), list(known), n=1, cutoff=0.6)
        hint = f"; did you mean {known[close[0]]}?" if close else ""
        return f"unknown flag {flag}{hint} (--help lists the flags)"

    def _all_flags(self) -> List[Tuple[str, str]]:
        """(flag, the flag as --help shows it) for every long flag, subcommands' too."""
        options, shown, flags = [], {}, []
        for action in self._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    options.append((option, action.dest))
                    if action.help != argparse.SUPPRESS:  # a hidden alias shows as its dest's flag
                        shown.setdefault(action.dest, option)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    flags += sub._all_flags()
        return flags + [(option, shown.get(dest, option)) for option, dest in options]

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", _SubParser)
        return super().add_subparsers(**kwargs)

    def error(self, message: str):
        print_error(message)
        self.exit(2)

    def print_help(self, file=None):
        if is_first_rank():
            super().print_help(file)


class _SubParser(ArgumentParser):
    """A subcommand's parser: unknown flags go back to the main parser, which names them."""

    _is_subparser = True


def _docstring_parts(doc: str) -> Tuple[str, Dict[str, str]]:
    """(text before `Args:`, {parameter: its description}) of a Google-style docstring."""
    lines = inspect.cleandoc(doc or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return "\n".join(lines).strip(), {}
    described: Dict[str, str] = {}
    name = None
    indent = None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:  # the next section
            break
        entry = re.match(r"\s*(\w+)(?: \([^)]*\))?:\s*(.*)", line)
        if entry and (indent is None or depth == indent):
            indent = depth
            name = entry.group(1)
            described[name] = entry.group(2)
        elif name is not None:
            described[name] += " " + line.strip()
    return "\n".join(lines[:start]).strip(), described


def _is_optional(annotation) -> Tuple[bool, object]:
    """(whether None is allowed, the other type) of `annotation`."""
    if typing.get_origin(annotation) is typing.Union:
        others = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(others) == 1 and len(typing.get_args(annotation)) == 2:
            return True, others[0]
    return False, annotation


def _converter(kind, optional: bool, flag: str) -> Tuple[Callable[[str], object], str]:
    """A function from the typed text to a value of `kind`, and the metavar to show."""
    if typing.get_origin(kind) is typing.Literal:
        choices = typing.get_args(kind)

        def choice(text: str):
            for value in choices:
                if str(value) == text:
                    return value
            if optional and text.lower() == "none":
                return None
            allowed = ", ".join(map(str, choices)) + (" or none" if optional else "")
            raise argparse.ArgumentTypeError(f"expected one of {allowed}, got {text!r}")

        choice.choices, choice.takes_none = choices, optional  # for flag_table
        return choice, "{" + ",".join(map(str, choices)) + "}"
    if kind is str:
        return str, "TEXT"
    if kind is bool:

        def boolean(text: str) -> bool:
            if text.lower() in ("true", "yes", "1", "on"):
                return True
            if text.lower() in ("false", "no", "0", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")

        return boolean, "BOOL"
    if kind in (int, float):
        noun = "an integer" if kind is int else "a number"

        def number(text: str):
            if optional and text.lower() == "none":
                return None
            try:
                return kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected {noun}{' or none' if optional else ''}, got {text!r}"
                ) from None

        number.takes_none = optional  # for flag_table
        return number, kind.__name__.upper()
    raise TypeError(f"cli: no flag can be made for parameter {flag!r} of type {kind!r}")


def _default_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


class SignatureParser(ArgumentParser):
    """The parser `parser_for` builds: one flag per parameter of a `main`, which also
    takes the command lines of Meta's `fire.Fire(main)` scripts (the module's docstring).

    Before argparse reads them, fire's spellings of a flag become `--name`, and the
    values given without a flag become `--name=value` for the parameter in their place.
    """

    def __init__(self, parameters: List[str], switches: List[str], **kwargs):
        super().__init__(**kwargs)
        self.parameters = parameters  # in the signature's order: the order of positional values
        self.switches = switches  # the bool ones, which also take --noNAME

    def parse_known_args(self, args=None, namespace=None):
        given = list(sys.argv[1:] if args is None else args)
        # What follows a "--" is values, even where it starts with - (as for argparse).
        cut = given.index("--") if "--" in given else len(given)
        flags, values = self._split([self._canonical(token) for token in given[:cut]])
        values += given[cut + 1 :]
        flagged = {self._option_string_actions[token.split("=", 1)[0]].dest
                   for token in flags if not self._is_value(token)}
        for position, value in enumerate(values):
            if position >= len(self.parameters):
                self.error(f"unexpected argument {value!r} ({self._order()})")
            name = self.parameters[position]
            if name in flagged:
                self.error(f"{name} is given twice: as --{name} and as the value {value!r} in position "
                           f"{position + 1} ({self._order()})")
            flags.append(f"--{name}={value}")
        return super().parse_known_args(flags, namespace)

    def _canonical(self, token: str) -> str:
        """`token` as argparse knows it, where fire would read it as a parameter's flag:
        `-name`, `--name` or `--noname` (a bool's), `-` or `_` anywhere in the name."""
        spelled = re.fullmatch(r"--?([A-Za-z][\w-]*)(=.*)?", token, re.DOTALL)
        if spelled is None:
            return token
        name, value = spelled.group(1).replace("-", "_"), spelled.group(2) or ""
        if name in self.parameters:
            return f"--{name}{value}"
        if not value and name.startswith("no") and name[2:] in self.switches:
            return f"--{name}"
        return token

    def _is_value(self, token: str) -> bool:
        """True where argparse reads `token` as a value, not as a flag: as for argparse,
        text, a negative number, a `-` with a space (`-x y`)."""
        return self._parse_optional(token) is None

    def _split(self, tokens: List[str]) -> Tuple[List[str], List[str]]:
        """(the flags with their values, the values without a flag), as argparse splits
        them; an unknown flag is an error here, before any value is placed."""
        flags, values = [], []
        index = 0
        while index < len(tokens):
            token = tokens[index]
            if self._is_value(token):
                values.append(token)
                index += 1
                continue
            if token.split("=", 1)[0] not in self._option_string_actions:
                self.error(self._unknown_message([token]))
            flags.append(token)
            action = self._option_string_actions.get(token)  # None for --name=value
            if action is not None and action.nargs != 0:
                following = tokens[index + 1] if index + 1 < len(tokens) else None
                if following is not None and self._is_value(following):
                    flags.append(following)
                    index += 1
                elif action.nargs is None:  # a value is required (a bool's is not)
                    hint = ""
                    if following is not None and following.split("=", 1)[0] not in self._option_string_actions:
                        hint = f" (a value that starts with - is written {token}={following})"
                    self.error(f"argument {token}: expected one argument{hint}")
            index += 1
        return flags, values

    def _order(self) -> str:
        shown = ", ".join(self.parameters[:3]) + (", ..." if len(self.parameters) > 3 else "")
        return f"values without a flag are, in order, {shown}"


def parser_for(main: Callable, prog: Optional[str] = None, description: Optional[str] = None) -> SignatureParser:
    """A `SignatureParser` with one flag per parameter of `main` (a required one for a
    parameter without a default), described by `main`'s docstring."""
    summary, described = _docstring_parts(main.__doc__ or "")
    if description is None:
        description = summary or (sys.modules.get(main.__module__).__doc__ or "").strip()
    hints = typing.get_type_hints(main)
    flags = []
    for name, param in inspect.signature(main).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"cli: main may not take *{name} or **{name}")
        annotation = hints.get(name, type(param.default) if param.default not in (param.empty, None) else str)
        optional, kind = _is_optional(annotation)
        flags.append((name, param.default, kind, *_converter(kind, optional, name)))
    switches = [name for name, _, kind, _, _ in flags if kind is bool]
    names = [name for name, *_ in flags]
    in_order = " ".join(name.upper() for name in names[:2]) + (" ..." if len(names) > 2 else "")
    epilog = f"Values given without a flag are taken in the order above, as by Meta's scripts:\n  %(prog)s {in_order}"
    parser = SignatureParser(names, switches, prog=prog, description=description, epilog=epilog if names else None)
    for name, default, kind, convert, metavar in flags:
        help_text = described.get(name, "").replace("%", "%%")
        if default is inspect.Parameter.empty:
            parser.add_argument(f"--{name}", type=convert, metavar=metavar, required=True, help=help_text)
            continue
        # `--compile` alone means true; `--compile false` and `--nocompile` are also accepted.
        value = dict(nargs="?", const=True) if kind is bool else {}
        parser.add_argument(f"--{name}", type=convert, default=default, metavar=metavar, help=help_text, **value)
        if kind is bool:
            parser.add_argument(f"--no{name}", dest=name, action="store_const", const=False,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def refuse_used_destination(parser: argparse.ArgumentParser, path) -> None:
    """Exit with status 2, as for any command-line error, unless `path` is absent
    or an empty directory.

    The tools that write a checkpoint call it right after parsing, before
    importing torch, so that a destination in use is named at once rather than
    after seconds of imports; `atomic.output_dir` keeps the same check, in the
    same words, for callers of the library.
    """
    problem = atomic.destination_problem(path)
    if problem is not None:
        parser.error(problem)


# --- documentation ---


def flag_table(parser: argparse.ArgumentParser) -> str:
    """`parser`'s arguments as a Markdown table (argument, value, default, meaning), as
    --help describes them; hidden aliases, --help and subcommands are left out."""
    rows = ["| argument | value | default | meaning |", "|---|---|---|---|"]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            name = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
            default = "required" if action.required else _default_cell(action)
        else:
            name = action.metavar or action.dest.upper()
            default = "required"
        # Expanded as --help expands it: a help text may name %(default)s, and a % is written %%.
        params = {key: value for key, value in vars(action).items() if value is not argparse.SUPPRESS}
        meaning = " ".join(((action.help or "") % dict(params, prog=parser.prog)).split())
        rows.append(f"| `{name}` | {_value_text(action)} | {_cell(default)} | {_cell(meaning)} |")
    return "\n".join(rows) + "\n"


def _value_text(action: argparse.Action) -> str:
    """What an argument takes, for flag_table."""
    if action.nargs == 0:
        return "no value (a switch)"
    takes_none = getattr(action.type, "takes_none", False)
    choices = action.choices or getattr(action.type, "choices", None)
    if choices:
        values = [f"`{value}`" for value in choices] + (["`none`"] if takes_none else [])
        return ", ".join(values[:-1]) + " or " + values[-1] if len(values) > 1 else values[0]
    if action.metavar == "BOOL":
        return "`true` or `false`; alone: true"
    kind = {"INT": "an integer", "FLOAT": "a number", "TEXT": "text"}.get(
        action.metavar or getattr(action.type, "__name__", "str").upper(), "text"
    )
    return kind + (" or `none`" if takes_none else "")


def _default_cell(action: argparse.Action) -> str:
    """A flag's default for flag_table: a value as typed (`float32`, not 'float32');
    "none" (not given, as the meanings say it) or "off" (a switch) where it cannot be typed."""
    if action.nargs == 0:
        return "off" if action.default is False else "on"
    if action.default is None:
        return "`none`" if getattr(action.type, "takes_none", False) else "none"
    if isinstance(action.default, str):
        return f"`{action.default}`" if action.default else '`""`'
    return f"`{_default_text(action.default)}`"


def _cell(text: str) -> str:
    """`text` inside a Markdown table cell: a | would end the cell."""
    return text.replace("|", "\\|")


# --- running ---


# The library's own errors of other types, each documented in docs/reliability.md with what
# to do, by the module that raises them. An exception of another type, or from elsewhere, is
# not on this list: native.py's RuntimeErrors, for one, guard the library's own invariants.
DOCUMENTED_ERRORS = {
    "generation.py": (FloatingPointError, RuntimeError),  # logits not finite; a stream overtaken
    "memory.py": (RuntimeError,),  # a memory-mapped shard changed on disk
    "kernels.py": (RuntimeError,),  # no int8, int4 or bf16 kernel on this device or torch build
}


def is_user_error(error: BaseException, own_files=()) -> bool:
    """True for errors about the user's input or machine, shown in one line:

    - any OSError (a missing file, a permission, a full disk: the message
      names the path);
    - a ValueError or TypeError raised on purpose by this library or by the
      script (`own_files`): its innermost frame is a `raise` statement in
      one of those files. The same exception types raised elsewhere ("too
      many values to unpack", a ValueError inside torch) are bugs and keep
      their traceback;
    - an error of a type in DOCUMENTED_ERRORS raised on purpose (a `raise`
      statement) by the module it is listed for: non-finite logits, a
      checkpoint shard changed on disk.
    """
    if isinstance(error, OSError):
        return True
    tb = _innermost_frame(error)
    if tb is None:
        return False
    filename = Path(tb.tb_frame.f_code.co_filename).resolve()
    if not linecache.getline(str(filename), tb.tb_lineno).strip().startswith("raise"):
        return False
    in_library = _PACKAGE_DIR in filename.parents
    if isinstance(error, (ValueError, TypeError)):
        return in_library or filename in {Path(f).resolve() for f in own_files}
    return filename.parent == _PACKAGE_DIR and type(error) in DOCUMENTED_ERRORS.get(filename.name, ())


# What requirements.txt names (each imports under its own name): what `pip install -e .`
# installs. A script run from a checkout before that fails on importing one of them.
REQUIRED_PACKAGES = ("torch", "fairscale", "sentencepiece", "tqdm", "safetensors", "tiktoken", "regex", "numpy")
CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def missing_requirement(error: ModuleNotFoundError) -> Optional[str]:
    """What to install, in one line, when `error` is about a package of REQUIRED_PACKAGES
    (not about a part of one: that is a broken install); None for any other module."""
    if error.name not in REQUIRED_PACKAGES:
        return None
    name = error.name
    if name != "torch" and importlib.util.find_spec("torch") is None:
        # torch is missing too, though another package was imported first: name torch, with the
        # line that installs its CPU build.
        name = "torch"
    checkout = _PACKAGE_DIR.parent
    where = f"in {checkout}" if (checkout / "setup.py").is_file() else "in the llama checkout"
    message = f"the package {name} is not installed: run pip install -e . {where} to install what the library needs"
    if name == "torch":
        message += f" (on a machine without an NVIDIA GPU, first {CPU_TORCH}: the CPU build, a smaller download)"
    return message


def call(work: Callable, *args, own_files=(), **kwargs) -> int:
    """`work(*args, **kwargs)`; returns 0, or 1 after printing a user error in one
    line (once, see `report_error`) or what to install for a missing requirement, or
    130 after Ctrl-C; 1 also, silently, when a collective failed because a peer that
    showed its own error has gone. Any other exception propagates."""
    try:
        work(*args, **kwargs)
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    except ModuleNotFoundError as error:
        message = missing_requirement(error)
        if os.environ.get("LLAMA_TRACEBACK") or message is None:
            raise
        print_error(message)
        return 1
    except Exception as error:
        if os.environ.get("LLAMA_TRACEBACK"):
            raise
        if is_user_error(error, own_files):
            report_error(error)
            return 1
        distributed = sys.modules.get("llama.distributed")
        if distributed is not None and distributed.is_explained_by_a_peer(error):
            return 1  # a peer showed its error and left: this rank's collective failed for it
        raise
    return 0


def run_tool(main: Callable[[], int]) -> None:
    """`sys.exit(main())` for a `python -m llama.X` tool, whose `main` parses its own
    flags: a required package missing (run before `pip install -e .`) is named in one
    line with what to install, as `call` does for the scripts."""
    try:
        status = main()
    except ModuleNotFoundError as error:
        message = missing_requirement(error)
        if os.environ.get("LLAMA_TRACEBACK") or message is None:
            raise
        print_error(message)
        status = 1
    sys.exit(status)


def refuse_hidden_package() -> None:
    """Exit with one line when a folder named llama beside the script hides this package.

    Python then imports that folder as an empty namespace package `llama`;
    with an editable install, submodules such as `llama.cli` may still be
    found, so the scripts get this far and would fail later on `Llama`.
    """
    package = sys.modules.get("llama")
    if package is not None and getattr(package, "__file__", None) is None:
        print_error(
            f"the folder {list(package.__path__)[0]} hides the llama package from this script: "
            "move the script into that folder, or into one with no folder named llama (docs/cli.md)"
        )
        sys.exit(1)


def run(main: Callable, argv: Optional[List[str]] = None, prog: Optional[str] = None) -> None:
    """Parse the command line for `main` (see the module's docstring), call it, and exit."""
    refuse_hidden_package()
    args = parser_for(main, prog=prog).parse_args(argv)
    status = call(main, own_files=[inspect.getfile(main)], **vars(args))
    if status == 0 and "llama.distributed" in sys.modules:
        from llama.distributed import end_process

        end_process(0)  # under torchrun with gloo: past the group's teardown (see there)
    sys.exit(status)
