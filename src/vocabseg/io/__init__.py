"""Reading images and drawing results."""
