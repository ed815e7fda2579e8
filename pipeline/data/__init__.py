"""Where cases come from (sources), how they are prepared (transforms), and the embedded demo set (phantom)."""
