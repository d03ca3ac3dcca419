"""Reading whole numbers: numbers written from MNIST digits (numbers) and the reader that cuts a
line into digits and answers each (segment)."""
