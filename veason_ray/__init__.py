"""veason-ray: the Veason-R1 method as pure Python."""
