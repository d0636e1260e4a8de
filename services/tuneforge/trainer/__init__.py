"""trainer: workers that pull training work, run plugin methods (TRL + peft), write adapters."""
