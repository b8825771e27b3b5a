"""Built-in plugins, installed as ``sgdprobe.plugins`` and found through the ``sgdprobe`` entry-point
group exactly as third-party plugins are. They use only sgdprobe's public API."""
