"""Sphinx configuration for captum-relp.

Build (as CI does): ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
Notebooks in ``tutorials/`` (reached through the ``docs/tutorials`` symlink) are
executed at every build, and the rule tables are generated from the live registry
by ``_ext/relp_tables.py``, so neither can drift from the code.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "_ext"))
sys.path.insert(0, os.path.dirname(HERE))

import captum_relp  # noqa: E402

project = "captum-relp"
author = "captum-relp developers"
copyright = "2025, captum-relp developers"
release = captum_relp.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # ships MathJax 3 in _static/mathjax and points mathjax_path at it: math renders offline
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
    "myst_nb",
    "relp_tables",
    "relp_cli",
    "relp_figures",  # a tutorial cell that draws a figure and shows none fails the build
    # "[docs]" links of the source pages point at the documented name; a link to a missing page or
    # anchor anywhere in the HTML fails the build
    "relp_links",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = [
    "_build",
    "api/generated/*.rst.orig",
    "jupyter_execute",
    "_generated",  # fragments included by rules.md, not pages of their own
    "Thumbs.db",
    ".DS_Store",
    "**.ipynb_checkpoints",
    "tutorials/README*",
    "results_measured.md",  # written by scripts/make_results.py, included by results_embedded.md
    "results_models.md",  # written by scripts/make_results.py, included by results_real_models.md
    # written by scripts/calibration_eval.py --markdown and make_results.py --real-model, included by
    # results_calibration_detail.md
    "results_calibration.md",
    "results_calibration_smollm2.md",
    "results_edges.md",  # written by scripts/make_edge_results.py, included by results_edges_detail.md
    "results_performance_detail.md",  # benchmark write-ups, included by results_performance.md
]

# -- MyST / notebooks --------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "force"
# the notebook kernels inherit this: one thread each. Two threads on a 2-core machine that other jobs
# share made the tutorials several times slower (tutorial 04: 276 s against about 40 s); a thread
# count given in the environment wins
os.environ.setdefault("OMP_NUM_THREADS", "1")
nb_execution_timeout = 900  # per cell; a shared 2-core machine needs the margin
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
# stderr (e.g. tqdm's "IProgress not found" notice on import) is not shown; errors still fail the build
nb_output_stderr = "remove"

# -- autodoc -----------------------------------------------------------------
autosummary_generate = True
templates_path = ["_templates"]
autodoc_default_options = {"members": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# types go into the parameters a docstring documents, in the field list that documents them; with
# "all", a field list after prose (Returns:) got a second, description-less copy of every parameter
autodoc_typehints_description_target = "documented"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # dataclass fields are documented once, by autodoc

# -- cross-references ----------------------------------------------------------
# Every broken reference is an error. Intersphinx needs network, so third-party
# names without an inventory are listed here explicitly.
nitpicky = True
nitpick_ignore = [
    ("py:class", "captum_relp.calibration._select.GroupData"),  # private type in a public signature
    # PyTorch (type hints and docstrings)
    ("py:class", "torch.Tensor"),
    ("py:class", "Tensor"),
    ("py:class", "nn.Module"),
    ("py:class", "torch.nn.modules.module.Module"),
    # Captum (base classes, type hints, references in prose)
    ("py:class", "captum.attr.LayerActivation"),
    ("py:class", "captum.attr.LayerGradientXActivation"),
    ("py:class", "captum.attr.LayerIntegratedGradients"),
    ("py:class", "captum.attr.LLMGradientAttribution"),
    ("py:class", "captum.attr._utils.attribution.LayerAttribution"),
    ("py:class", "captum.attr._utils.attribution.GradientAttribution"),
    ("py:class", "captum.attr._core.layer.layer_gradient_x_activation.LayerGradientXActivation"),
    ("py:class", "captum._utils.typing.ModuleOrModuleList"),
    # Google-style docstring type words ("int, optional", "callable")
    ("py:class", "optional"),
    ("py:class", "callable"),
    # private names that appear in signatures / bases
    ("py:class", "IdsType"),
    ("py:class", "RulesLike"),
    ("py:class", "Callable"),
    # ForwardPatchRule's summary line in the API autosummary table (it resolves on the
    # class page itself, where the method is documented)
    ("py:meth", "patched_forward"),
    # standard library / third-party types in signatures (no intersphinx offline)
    ("py:class", "pathlib.Path"),
    ("py:class", "Path"),
    ("py:class", "numpy.ndarray"),
    ("py:class", "torch.dtype"),
    ("py:class", "torch.nn.modules.container.ModuleList"),
    ("py:class", "argparse.ArgumentParser"),
    ("py:class", "transformers.GPT2LMHeadModel"),
    ("py:class", "transformers.LlamaForCausalLM"),
    ("py:class", "Module"),
    ("py:class", "sequence"),
]
# napoleon reads some "name (type): text" attribute lines and module constants as types
nitpick_ignore_regex = [
    ("py:class", r"(n_forward|n_layers|n_heads|n_nodes|thresholds|faithfulness|model_name|Downstream inputs.*|"
                 r"The standard component types.*|SparseAutoencoder)"),
    ("py:(data|func|attr)", r"(NAMES|PLACES|OBJECTS|TEMPLATES|NOUNS|DEFAULT_FRACTIONS|tile_rows|"
                            r"infer_groups|default_candidates|layout)"),
]

# -- HTML ----------------------------------------------------------------------
html_theme = "furo"
html_title = f"captum-relp {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "sidebar_hide_name": False,
    "navigation_with_keys": True,
}
pygments_style = "friendly"
pygments_dark_style = "monokai"


def _resolve_reexports(app, env, node, contnode):
    """Resolve ``captum_relp.sub.module.Name`` to the documented ``captum_relp.Name``.

    Docstrings refer to objects by their defining module (e.g.
    ``captum_relp.metrics.logit_diff``); the API reference documents them where
    users import them from (the package root or ``captum_relp.rules``).
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    qualified = target.startswith("captum_relp.")
    if not qualified and "." in target:
        return None
    name = target.rsplit(".", 1)[-1]
    domain = env.get_domain("py")
    for candidate in (f"captum_relp.{name}", f"captum_relp.rules.{name}"):
        if candidate != target and candidate in domain.objects:
            break
    else:
        # a bare name used inside a docstring of the package (``half_product``)
        matches = [obj for obj in domain.objects
                   if obj.startswith("captum_relp.") and obj.rsplit(".", 1)[-1] == name]
        if len(matches) != 1 or (not qualified and not node["refdoc"].startswith("api/")):
            return None
        candidate = matches[0]
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                               candidate, node, contnode)


def _public_bases(app, name, obj, options, bases):
    """Show the nearest public ancestors instead of private base classes."""

    def is_private(cls):
        parts = f"{cls.__module__}.{cls.__qualname__}".split(".")
        return cls.__module__.startswith("captum_relp") and any(p.startswith("_") for p in parts)

    def expand(cls):
        if not is_private(cls):
            return [cls]
        return [b for base in cls.__bases__ for b in expand(base)]

    public = []
    for base in bases:
        for cls in expand(base):
            if cls not in public and cls is not object:  # "Bases: object" says nothing
                public.append(cls)
    bases[:] = public


def _link_images_to_full_size(app, doctree, docname):
    """Every figure opens at full size when clicked (notebook outputs included).

    Sphinx links an image to its file only when it has a size option; ``scale: 100``
    keeps the natural size (the CSS fits it to the column) and turns that link on.
    """
    from docutils import nodes

    for image in doctree.findall(nodes.image):
        if isinstance(image.parent, nodes.reference) or any(k in image for k in ("scale", "width", "height")):
            continue
        image["scale"] = 100


def _copy_executed_notebooks(app, exception):
    """Put each tutorial notebook, as executed by this build (outputs included), next to its page."""
    import shutil

    if exception is not None or app.builder.name != "html":
        return
    executed = os.path.join(os.path.dirname(app.outdir), "jupyter_execute", "tutorials")
    for name in sorted(os.listdir(os.path.join(HERE, "tutorials"))):
        if name.endswith(".ipynb"):
            source = os.path.join(executed, name)
            if not os.path.exists(source):
                raise FileNotFoundError(f"{source}: the executed notebook is missing (nb_execution_mode?)")
            os.makedirs(os.path.join(app.outdir, "tutorials"), exist_ok=True)
            shutil.copyfile(source, os.path.join(app.outdir, "tutorials", name))


def setup(app):
    app.connect("doctree-resolved", _link_images_to_full_size)
    app.connect("build-finished", _copy_executed_notebooks)
    app.connect("missing-reference", _resolve_reexports)
    app.connect("autodoc-process-bases", _public_bases)
