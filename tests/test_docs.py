"""The README and docs/ pages: every link and anchor resolves, every command they show runs a real entry point
with real flags, every Python import they show exists.

Commands are read from ```bash code blocks only (prose may name flags of branches not merged yet). A script or
module's flags come from its configuration dataclass through `pruner.cli.build_parser`, the parser the script
itself uses, so renaming a field fails this test; torchrun's flags come from torchrun's own parser.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

from pruner.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
SHELL_LANGS = {"bash", "sh", "shell", "console"}
# Commands a page may show besides the project's entry points; their own arguments are not checked.
PLAIN_COMMANDS = {"cd", "git", "export", "source", "ls", "cat", "flock", "timeout"}
EXTERNAL_MODULES = {"pytest", "pip", "venv"}
# A first argument that hands the command line to another entry point's parser.
SUBCOMMANDS = {("pruner/presample.py", "--merge"): "pruner/shards.py"}


# ---- Markdown --------------------------------------------------------------------------------------------

def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, line of the opening fence) of every fenced block."""
    return [(m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code, line numbers kept."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_with_code_spans(text).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        out.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return out


def prose_with_code_spans(text: str) -> str:
    """The text outside fenced blocks (a heading's inline code counts in its anchor)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def links(text: str) -> list[tuple[str, int]]:
    """(target, line) of every Markdown link and image outside code."""
    clean = prose(text)
    return [(m.group(1), clean.count("\n", 0, m.start()) + 1)
            for m in re.finditer(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", clean)]


def broken_links(page: Path) -> list[str]:
    problems = []
    for target, line in links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}:{line}: {target}"
        if not dest.exists():
            problems.append(f"{where}: {path} does not exist")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest.read_text())):
            problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return problems


# ---- commands ----------------------------------------------------------------------------------------------

def shell_commands(body: str) -> list[tuple[list[str], int]]:
    """(argv, line offset in the block) of each command: continuations joined, comments dropped, split at && ; |."""
    out, pending, start = [], "", 0
    for offset, line in enumerate(body.splitlines()):
        if not pending:
            start = offset
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        lexer = shlex.shlex(pending, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        argv: list[str] = []
        for token in list(lexer) + [";"]:
            if token.strip(";&|"):
                argv.append(token)
            elif argv:
                out.append((argv, start))
                argv = []
        pending = ""
    return out


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M)}


def setup_extras() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require" and isinstance(node.value, ast.Dict):
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    return set()


def config_class(script: Path) -> type | None:
    """The dataclass whose fields are `script`'s flags: the first argument of its `parse_config(...)` call (in
    `main` if it has several), found in the module that defines or imports that name."""
    tree = ast.parse(script.read_text())
    calls = []
    for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        for call in (n for n in ast.walk(func) if isinstance(n, ast.Call)):
            if getattr(call.func, "id", None) == "parse_config" and call.args and isinstance(call.args[0], ast.Name):
                calls.append((func.name != "main", call.args[0].id))
    if not calls:
        return None
    name = sorted(calls)[0][1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and any(a.name == name for a in node.names):
            return getattr(importlib.import_module(node.module), name)
    module = ".".join(script.relative_to(ROOT).with_suffix("").parts)
    return getattr(importlib.import_module(module), name)


def parse_error(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """argparse's own message when `argv` is not a valid command line for `parser`, else None. Abbreviated
    flags are refused: a page must spell a flag out (else renaming `--lam` to `--lam-weight` would pass)."""
    parser.allow_abbrev = False
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit as exc:
        return None if exc.code == 0 else err.getvalue().strip().splitlines()[-1]
    return None


def check_entry_point(script: Path, argv: list[str]) -> str | None:
    """Why `python script argv...` is not a real command line, or None."""
    if not script.is_file():
        return f"{script.relative_to(ROOT) if script.is_relative_to(ROOT) else script} does not exist"
    rel = script.relative_to(ROOT).as_posix()
    if argv and (rel, argv[0]) in SUBCOMMANDS:
        return check_entry_point(ROOT / SUBCOMMANDS[rel, argv[0]], argv[1:])
    cls = config_class(script)
    if cls is None:
        return f"{rel} takes no flags, got {argv}" if argv else None
    return parse_error(build_parser(cls, prog=rel), argv)


def check_python(argv: list[str]) -> str | None:
    """`python [-m module | script] args...`."""
    if argv[:1] == ["-c"]:
        return None
    if argv[:1] == ["-m"]:
        module = argv[1]
        if module.split(".")[0] in EXTERNAL_MODULES:
            return None
        path = ROOT.joinpath(*module.split("."))
        script = path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__main__.py"
        return check_entry_point(script, argv[2:])
    return check_entry_point(ROOT / argv[0], argv[1:])


def check_torchrun(argv: list[str]) -> str | None:
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    if error := parse_error(parser, argv):
        return f"torchrun: {error}"
    args = parser.parse_args(argv)
    target = (["-m", args.training_script] if args.module else [args.training_script]) + args.training_script_args
    return check_python(target)


def check_command(argv: list[str]) -> str | None:
    """Why this command names no real entry point, target or flag; None when it does."""
    while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    program, args = argv[0], argv[1:]
    if program in ("python", "python3") or program.endswith("/python"):
        return check_python(args)
    if program == "torchrun":
        return check_torchrun(args)
    if program == "make":
        missing = [t for t in args if not t.startswith("-") and "=" not in t and t not in makefile_targets()]
        return f"no Makefile target {missing}" if missing else None
    if program == "bash":
        script = ROOT / args[0]
        if not script.is_file():
            return f"{args[0]} does not exist"
        unknown = [f for f in args[1:] if f.startswith("-") and f not in script.read_text()]
        return f"{args[0]} does not handle {unknown}" if unknown else None
    if program == "pip":
        extras = {e for a in args for m in [re.fullmatch(r"\.\[([\w,-]+)\]", a)] if m for e in m.group(1).split(",")}
        return f"setup.py has no extra {sorted(extras - setup_extras())}" if extras - setup_extras() else None
    if program in PLAIN_COMMANDS:
        return None
    return f"unknown command {program!r}"


def bad_commands(page: Path) -> list[str]:
    problems = []
    for lang, body, line in code_blocks(page.read_text()):
        if lang not in SHELL_LANGS:
            continue
        try:
            commands = shell_commands(body)
        except ValueError as exc:  # an unclosed quote: no shell would run the block either
            problems.append(f"{page.relative_to(ROOT)}:{line}: the block does not parse as shell: {exc}")
            continue
        for argv, offset in commands:
            if error := check_command(argv):
                problems.append(f"{page.relative_to(ROOT)}:{line + 1 + offset}: {shlex.join(argv)}\n    {error}")
    return problems


def missing_imports(page: Path) -> list[str]:
    """`from o1pruner_kernels... import X` / `from pruner... import X` in python blocks: X must exist."""
    problems = []
    for lang, body, line in code_blocks(page.read_text()):
        if lang != "python":
            continue
        for node in ast.walk(ast.parse(body)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("o1pruner_kernels", "pruner"):
                module = importlib.import_module(node.module)
                problems += [f"{page.relative_to(ROOT)}:{line + node.lineno}: {node.module} has no {a.name}"
                             for a in node.names if not hasattr(module, a.name)]
    return problems


# ---- the tests ---------------------------------------------------------------------------------------------

def test_every_relative_link_and_anchor_resolves():
    problems = [p for page in PAGES for p in broken_links(page)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_command_in_a_code_block_names_a_real_entry_point_and_flags():
    problems = [p for page in PAGES for p in bad_commands(page)]
    assert not problems, "commands that would fail:\n" + "\n".join(problems)


def test_every_import_in_a_python_block_exists():
    problems = [p for page in PAGES for p in missing_imports(page)]
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme_and_says_what_it_covers():
    readme_links = {target.partition("#")[0] for target, _ in links((ROOT / "README.md").read_text())}
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme_links, f"README.md does not link {page.name}"
        first = page.read_text().split("\n\n")[1]
        assert first.startswith("This page covers"), f"{page.name}: the first paragraph must say what it covers"


# ---- the checker checks what it should -----------------------------------------------------------------------

@pytest.mark.parametrize("heading, anchor", [
    ("The paper's comparisons on the embedded default", "the-papers-comparisons-on-the-embedded-default"),
    ("What `make demo` shows", "what-make-demo-shows"),
    ("Run folders: manifests, locks, resume and overwrite", "run-folders-manifests-locks-resume-and-overwrite"),
    ("Kernels (`import o1pruner_kernels`)", "kernels-import-o1pruner_kernels"),
    ("Set-up", "set-up"),
])
def test_slug_follows_github(heading, anchor):
    assert slug(heading) == anchor


def test_repeated_headings_get_numbered_anchors_and_code_is_not_a_heading():
    text = "# A\n## Notes\n```bash\n# Notes\n```\n## Notes\n"
    assert anchors(text) == {"a", "notes", "notes-1"}


@pytest.mark.parametrize("command, error", [
    ("python -m pruner.plan --arch qwen2.5-32b --gpus 8", None),
    ("python -m pruner.plan --gpu 8", "unrecognized arguments: --gpu 8"),  # not an abbreviation of --gpus
    ("python -m pruner.plan --json --activation-checkpointing --no-activation-checkpointing", None),
    ("python -m pruner.plan --arch gpt-5", "invalid choice: 'gpt-5'"),
    ("python pruner/dataset.py --lam 5 --no-report", None),
    ("python pruner/presample.py --merge out.jsonl a.jsonl b.jsonl --overwrite", None),
    ("python pruner/presample.py --merge out.jsonl a.jsonl --k 4", "unrecognized arguments: --k"),
    ("torchrun --nproc_per_node 2 pruner/train.py --resume --lr 1e-5", None),
    ("torchrun --nproc-per-node 2 -m pruner.train --micro-batch-size 1", None),
    ("torchrun --procs 2 pruner/train.py", "torchrun: "),
    ("torchrun --nproc_per_node 2 pruner/train.py --learning-rate 1", "unrecognized arguments: --learning-rate"),
    ("python bench/nonsense.py", "bench/nonsense.py does not exist"),
    ("OUT=runs/x bash bench/gpu_check.sh --dry", None),
    ("bash bench/gpu_check.sh --wet", "does not handle ['--wet']"),
    ("make demo test-fast", None),
    ("make demos", "no Makefile target ['demos']"),
    ("pip install -e '.[gpu]'", None),
    ("pip install -e '.[tpu]'", "setup.py has no extra ['tpu']"),
    ("pyhton bench/speed.py", "unknown command 'pyhton'"),
])
def test_the_command_check_catches_what_would_fail(command, error):
    (argv, _), = shell_commands(command)
    found = check_command(argv)
    assert (found is None) if error is None else (found is not None and error in found), found


def test_a_renamed_config_field_fails_the_check(monkeypatch):
    # The flags come from the dataclass, not from a list in this test: rename a field and the page's flag fails.
    import dataclasses

    from pruner import configs

    renamed = dataclasses.make_dataclass("DatasetConfig", [
        ("lam_weight" if f.name == "lam" else f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
        for f in dataclasses.fields(configs.DatasetConfig)])
    renamed.__module__ = "pruner.configs"  # its string annotations resolve there
    monkeypatch.setattr(configs, "DatasetConfig", renamed)
    assert "unrecognized arguments: --lam" in check_command(["python", "pruner/dataset.py", "--lam", "5"])


def test_commands_split_at_continuations_comments_and_operators():
    body = "make demo    # a comment\npython a.py --x 1 \\\n    --y 2 && make test\n"
    assert shell_commands(body) == [(["make", "demo"], 0), (["python", "a.py", "--x", "1", "--y", "2"], 1),
                                    (["make", "test"], 1)]
