"""The client role: local DP-SGD training, the privacy ledger, protecting the update."""

import warnings

# Opacus' RDP-to-(ε, δ) conversion warns "Optimal order is the largest alpha. Please consider expanding
# the range of alphas" every time ε is computed: each round, and dozens of times while σ is planned. It
# means the best order lies at the edge of the orders searched, so the ε reported is *larger* than a
# wider search would give: a valid, conservative upper bound, never an under-report. fedveil therefore
# does not repeat it; set `privacy.accountant = "prv"` for a tighter figure (docs/benchmarks.md).
warnings.filterwarnings("ignore", message=r"Optimal order is the (largest|smallest) alpha")
