"""Where the run happens: TPU slice descriptions and providers that bring hosts up as Ray nodes."""
