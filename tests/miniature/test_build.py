import torch
from transformers import CLIPTokenizer

from imptome.miniature import build, data


def test_every_word_is_one_token():
    tok = build.build_tokenizer()
    for w in data.WORDS:
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, tok.convert_ids_to_tokens(ids))


def test_longest_prompt_fits():
    tok = build.build_tokenizer()
    objs = [data.Obj(3, 2, 6), data.Obj(4, 1, 8)]  # "bottom left: yellow triangle and bottom right: ..."
    ids = tok(data.prompt_for(objs)).input_ids
    assert len(ids) <= build.MAX_TOKENS
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_tokenizer_save_reload(tmp_path):
    tok = build.build_tokenizer()
    tok.save_pretrained(tmp_path)
    tok2 = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    p = "middle center: green circle and bottom left: magenta cross"
    assert tok(p).input_ids == tok2(p).input_ids


def test_unet_attends_at_top_level():
    unet = build.build_unet()
    assert unet.config.down_block_types[0] == "CrossAttnDownBlock2D"
    blocks = (*unet.config.down_block_types, *unet.config.up_block_types)
    assert all(t.startswith("CrossAttn") for t in blocks)
    vae = build.build_vae()
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, data.IMAGE_SIZE, data.IMAGE_SIZE)).latent_dist.mean
    assert z.shape[-2:] == (unet.config.sample_size, unet.config.sample_size) == (16, 16)
