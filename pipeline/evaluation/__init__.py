"""Scores against the truth: MONAI's metrics per case and class (`metrics`), a folder or split scored and compared
(`scoring`), with its report and figures (`report`, `plots`)."""
