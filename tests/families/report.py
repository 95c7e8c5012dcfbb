"""The family table's closing-note table: ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m tests.families.report``.

One row per family: in the table or refused, conservation error (relp-ah, float64, zero biases),
AP error (max over unpadded and padded prompts, against hook-based patching), edges yes/no
(with the larger of the none-patched / all-patched errors).
"""
import warnings

from captum_relp.families import FAMILY_TABLE
from tests.families.test_families import ap_error, conservation_error, edge_errors


def main() -> None:
    warnings.filterwarnings("ignore")
    print("| family | in/refused | conservation error (relp-ah) | AP error | edges |")
    print("|---|---|---|---|---|")
    for model_type in sorted(FAMILY_TABLE):
        family = FAMILY_TABLE[model_type]
        ap = max(ap_error(model_type, padded) for padded in (False, True))
        edges = f"yes ({max(edge_errors(model_type)):.1e})" if family.edges else "no (refused)"
        print(f"| {model_type} | in | {conservation_error(model_type):.1e} | {ap:.1e} | {edges} |", flush=True)


if __name__ == "__main__":
    main()
