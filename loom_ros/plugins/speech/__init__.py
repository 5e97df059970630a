"""Speech plugins: command recognition (pocketsphinx) and text to speech (pyttsx3 on espeak-ng)."""
