"""Built-in tuneforge plugins: training methods (SFT) and model families (Llama 3.x).

Each module is one plugin, registered through the ``tuneforge`` entry-point group exactly as a
third-party plugin would be.
"""
