/* FLASH_DEFAULT_TIMEOUT_S (django-flash's FLASH_DEFAULT_TIMEOUT): the
   lifetime of every class and model that sets none, while explicit ones
   (a class's, or its model's for get/filter classes) win. Run by
   `make headers`. */
#define FLASH_DEFAULT_TIMEOUT_S 60
#define FLASH_IMPLEMENTATION
#include "flash.h"

#include <stdio.h>

#define ITEM_FIELDS(F) F(I64, id) F(STR, name)
FLASH_MODEL(Item, ITEM_FIELDS)
FLASH_GET_KEYS(Item, (id))
FLASH_INSTANCE_CACHE_OPT(ItemOnName, Item, (name), .timeout_s = 5)
#define TAG_FIELDS(F) F(I64, id) F(STR, label)
FLASH_MODEL_OPT(Tag, TAG_FIELDS, .timeout_s = 3600)
FLASH_GET_KEYS(Tag, (id))

int main(void) {
    unsigned item = Item__get_by_id.canonical->opts.timeout_s, named = ItemOnName_class.canonical->opts.timeout_s,
             tag = Tag__get_by_id.canonical->opts.timeout_s;
    if (item != 60 || named != 5 || tag != 3600) {
        fprintf(stderr, "default_timeout: Item %u (want 60), ItemOnName %u (want 5), Tag %u (want 3600)\n", item,
                named, tag);
        return 1;
    }
    puts("default timeout: FLASH_DEFAULT_TIMEOUT_S for classes that set none; a class's or its model's own wins");
    return 0;
}
