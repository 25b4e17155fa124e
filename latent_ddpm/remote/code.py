"""The code a hub repo carries so that diffusers alone can load it (`trust_remote_code=True`).

diffusers 0.42 resolves `model_index.json` entries like this (see `pipeline_loading_utils`):

- `"_class_name": ["pipeline", "LatentDDPMPipeline"]`: a list means a custom pipeline; the class is
  read from `<repo>/pipeline.py` (`_resolve_custom_pipeline_and_cls`, `_get_custom_pipeline_class`).
- `"unet": ["advanced_unet", "AdvancedUNet2DModel"]`: a library name that is neither a diffusers/
  transformers library nor a diffusers pipeline module must be a file `<repo>/unet/advanced_unet.py`
  (`_get_custom_components_and_folders` refuses to download the repo otherwise, and `load_sub_model`
  imports the class from that file).

Both files are generated from this package's own `pipeline.py` and `unet.py`, so they never drift:
top-level relative imports are rewritten (`REWRITES`), and methods that import from the package
(the hub hooks, the original-checkpoint converter) are dropped. diffusers copies every relatively
imported module next to the file, so the generated files must not contain any (`_check`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]

#: model_index.json entries of an upload folder: [module file name (no .py), class name].
PIPELINE_ENTRY = ["pipeline", "LatentDDPMPipeline"]
UNET_ENTRY = ["advanced_unet", "AdvancedUNet2DModel"]
#: The package's own scheduler (opt-in), shipped only when the pipeline uses it.
SCHEDULER_ENTRY = ["hybrid_solver", "HybridDPMSolverMultistepScheduler"]

#: Generated file (path in the repo) -> source file in the package.
SOURCES = {f"{PIPELINE_ENTRY[0]}.py": "pipeline.py", f"unet/{UNET_ENTRY[0]}.py": "unet.py"}
SCHEDULER_SOURCES = {f"scheduler/{SCHEDULER_ENTRY[0]}.py": "hybrid_solver.py"}

#: Top-level relative imports of the sources and their replacement in the hub copy. The pipeline only
#: needs the UNet class for its type annotation; the loaded UNet (from unet/advanced_unet.py) is a
#: `ModelMixin`, which keeps diffusers' type check of the component quiet.
REWRITES = {
    "from .unet import AdvancedUNet2DModel": (
        "# Hub copy: diffusers loads the UNet class from unet/advanced_unet.py; annotate with its base class.\n"
        "from diffusers.models.modeling_utils import ModelMixin as AdvancedUNet2DModel"
    ),
    # The UNet's presets and config checks: a module of plain Python, pasted in whole.
    "from .unet_config import PRESETS, downsample_factor, validate_config": "INLINE unet_config.py",
    # The pipeline's argument checks: plain Python too.
    "from .call_checks import check_call, check_callback, step_end_latents": "INLINE call_checks.py",
}

# diffusers' own test for relative imports (dynamic_modules_utils.get_relative_imports).
_RELATIVE_IMPORT = re.compile(r"^\s*(?:import\s+\.|from\s+\.\S*\s+import)", flags=re.MULTILINE)


def remote_code_files(version: str, hybrid_scheduler: bool = False) -> dict[str, str]:
    """The self-contained hub files, {path in the repo: source text}, generated from the package (with the
    scheduler's for a pipeline that uses the package's `HybridDPMSolverMultistepScheduler`)."""
    sources = {**SOURCES, **(SCHEDULER_SOURCES if hybrid_scheduler else {})}
    return {target: hub_source(source, version) for target, source in sources.items()}


def hub_source(filename: str, version: str) -> str:
    """The hub copy of `latent_ddpm/<filename>`: relative imports rewritten, package-only methods dropped."""
    text = (PACKAGE_DIR / filename).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    replace: dict[int, tuple[int, str]] = {}  # first line (0-based) -> (end line, exclusive; replacement)
    for node in ast.parse(text).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            statement = "".join(lines[node.lineno - 1: node.end_lineno]).strip()
            if statement not in REWRITES:
                raise RuntimeError(f"latent_ddpm/{filename}: no hub rewrite for {statement!r} (see REWRITES)")
            rewrite = REWRITES[statement]
            if rewrite.startswith("INLINE "):
                rewrite = _module_body(rewrite.removeprefix("INLINE "))
            replace[node.lineno - 1] = (node.end_lineno, rewrite + "\n")
        for item in node.body if isinstance(node, ast.ClassDef) else [node]:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _imports_package(item):
                start, end = _with_comments_above(lines, item), item.end_lineno
                if end < len(lines) and not lines[end].strip() and (start == 0 or not lines[start - 1].strip()):
                    end += 1  # drop one of the two blank lines around the removed method
                replace[start] = (end, "")
    out, i = [], 0
    while i < len(lines):
        if i in replace:
            i, text_in = replace[i][0], replace[i][1]
            out.append(text_in)
        else:
            out.append(lines[i])
            i += 1
    header = (f"# Generated by latent_ddpm.hub from latent_ddpm/{filename} (latent-ddpm {version}); do not edit.\n"
              "# Load the repo with diffusers.DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True).\n")
    result = header + "".join(out)
    _check(result, filename)
    return result


def _module_body(filename: str) -> str:
    """`latent_ddpm/<filename>` without its docstring and `from __future__` import (they must open a file),
    to paste into a hub copy in place of the import of it."""
    text = (PACKAGE_DIR / filename).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    body = ast.parse(text).body
    keep = [n for n in body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
            and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
    return f"# Inlined from latent_ddpm/{filename}.\n" + "".join(lines[keep[0].lineno - 1:]).rstrip()


def _imports_package(node: ast.AST) -> bool:
    return any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(node))


def _with_comments_above(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """0-based first line of `node`, including its decorators and the comment lines right above it."""
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    return start


def _check(source: str, filename: str) -> None:
    """The generated file must parse and must not import anything relatively (diffusers would fetch it)."""
    compile(source, f"<hub copy of latent_ddpm/{filename}>", "exec")
    match = _RELATIVE_IMPORT.search(source)
    if match:
        line = source[: match.start()].count("\n") + 1
        raise RuntimeError(f"hub copy of latent_ddpm/{filename} still has a relative import at line {line}")
