"""Pure cryptography and privacy maths on arrays and bytes. Imports neither Flower nor torch."""
