"""GSM8K and HellaSwag evaluation with every cdlm decoding method."""
