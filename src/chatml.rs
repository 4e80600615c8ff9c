//! ChatML, the chat format the models this project writes use (tiny test models and real-shape
//! synthetic ones): its special tokens and the Jinja chat template for `tokenizer_config.json`.

pub const BOS: &str = "<|im_start|>";
pub const EOS: &str = "<|im_end|>";
pub const PAD: &str = "<|endoftext|>";

pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
