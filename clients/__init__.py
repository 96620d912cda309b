"""The client role: local DP-SGD training, the privacy ledger, protecting the update."""
